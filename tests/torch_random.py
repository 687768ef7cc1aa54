"""Random weights for torch models in the equivalence tests (imported by them; not a test)."""

from __future__ import annotations

from typing import Any


def randomize_torch(module: Any, seed: int = 0) -> Any:
    """Random values in every parameter and float buffer (variances kept positive), eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
    return module.eval()
