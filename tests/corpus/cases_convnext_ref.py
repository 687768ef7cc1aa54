"""The ConvNeXt V1 and V2 reference implementation -> timm, and back (one of the peer's examples).

The reference (facebookresearch/ConvNeXt and ConvNeXt-V2) is written here as its repositories
define it: ``downsample_layers.i`` (the stem is the first) then ``stages.i.j`` blocks
(``dwconv``, ``norm``, ``pwconv1``, V2's ``grn.gamma``/``grn.beta`` stored ``(1, 1, 1, C)``,
``pwconv2``, V1's layer scale ``gamma``), ``norm``, ``head``. timm's ConvNeXt puts stage i's
downsampling inside stage i and stores GRN parameters as ``(C,)``. With dims 16..128 each
stage's GRN (4 x dim) has the size of a later stage's LayerNorm: the pair that once had 24
tensors silently swapped (issue 11, observation 2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tests.corpus.harness import Case, Pair, torch_pair

NUM_CLASSES = 10
FW = ("torch", "torchvision")  # timm is installed with torchvision (see .ci/run)


CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))


def _fb_convnext(v2: bool) -> Callable[[], Any]:
    """facebookresearch/ConvNeXt (v1) or ConvNeXt-V2's model, as their repositories define it."""

    def make() -> Any:
        import torch
        import torch.nn as nn
        import torch.nn.functional as F

        class LayerNorm(nn.Module):
            def __init__(self, dim: int, channels_first: bool = False) -> None:
                super().__init__()
                self.weight = nn.Parameter(torch.ones(dim))
                self.bias = nn.Parameter(torch.zeros(dim))
                self.channels_first, self.dim = channels_first, (dim,)

            def forward(self, x: Any) -> Any:
                if not self.channels_first:
                    return F.layer_norm(x, self.dim, self.weight, self.bias, 1e-6)
                u = x.mean(1, keepdim=True)
                s = (x - u).pow(2).mean(1, keepdim=True)
                x = (x - u) / torch.sqrt(s + 1e-6)
                return self.weight[:, None, None] * x + self.bias[:, None, None]

        class GRN(nn.Module):
            def __init__(self, dim: int) -> None:
                super().__init__()
                self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
                self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

            def forward(self, x: Any) -> Any:
                gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
                nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
                return self.gamma * (x * nx) + self.beta + x

        class Block(nn.Module):
            def __init__(self, dim: int) -> None:
                super().__init__()
                self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
                self.norm = LayerNorm(dim)
                self.pwconv1 = nn.Linear(dim, 4 * dim)
                self.act = nn.GELU()
                if v2:
                    self.grn = GRN(4 * dim)
                self.pwconv2 = nn.Linear(4 * dim, dim)
                if not v2:
                    self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

            def forward(self, x: Any) -> Any:
                y = self.dwconv(x).permute(0, 2, 3, 1)
                y = self.act(self.pwconv1(self.norm(y)))
                if v2:
                    y = self.grn(y)
                y = self.pwconv2(y)
                if not v2:
                    y = self.gamma * y
                return x + y.permute(0, 3, 1, 2)

        class ConvNeXt(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                dims, depths = CONVNEXT["dims"], CONVNEXT["depths"]
                self.downsample_layers = nn.ModuleList(
                    [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm(dims[0], True))]
                    + [
                        nn.Sequential(
                            LayerNorm(dims[i], True), nn.Conv2d(dims[i], dims[i + 1], 2, 2)
                        )
                        for i in range(3)
                    ]
                )
                self.stages = nn.ModuleList(
                    nn.Sequential(*[Block(dims[i]) for _ in range(depths[i])]) for i in range(4)
                )
                self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
                self.head = nn.Linear(dims[-1], NUM_CLASSES)

            def forward(self, x: Any) -> Any:
                for down, stage in zip(self.downsample_layers, self.stages, strict=True):
                    x = stage(down(x))
                return self.head(self.norm(x.mean([-2, -1])))

        return _scales_that_matter(ConvNeXt())

    return make


def _scales_that_matter(model: Any) -> Any:
    """Layer scales (1e-6) and GRN parameters (zeros) start where a swap of them would not
    show in the outputs; give them values that matter (both implementations' names)."""
    import torch

    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta", "grn.weight", "grn.bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _timm_convnext(v2: bool) -> Callable[[], Any]:
    def make() -> Any:
        from timm.models.convnext import ConvNeXt

        extra: dict[str, Any] = {"use_grn": True, "ls_init_value": None} if v2 else {}
        model = ConvNeXt(num_classes=NUM_CLASSES, **CONVNEXT, **extra)  # type: ignore[arg-type]
        return _scales_that_matter(model)

    return make


def convnext_order(names: list[str]) -> list[str]:
    """Float tensor names in an order where the reference's and timm's tensors line up.

    timm's definition order already does; the reference lists all ``downsample_layers`` before
    all ``stages``, where timm puts stage i's downsampling at the start of stage i. Used for
    `Pair.reference` only (diagnosis and the oracle's own test), never given to the matcher.
    """
    if not any(n.startswith("downsample_layers.") for n in names):
        return list(names)

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        i, n = item
        parts = n.split(".")
        if parts[0] == "downsample_layers":
            return (int(parts[1]), 0, i)
        if parts[0] == "stages":
            return (int(parts[1]), 1, i)
        return (4, 0, i)

    return [n for _, n in sorted(enumerate(names), key=key)]


def _convnext_case(v2: bool, to_timm: bool = True) -> Callable[[], Pair]:
    def build() -> Pair:
        ref, timm = _fb_convnext(v2), _timm_convnext(v2)
        return torch_pair(
            ref if to_timm else timm,
            timm if to_timm else ref,
            (1, 3, 32, 32),
            reference_order=convnext_order,
        )

    return build


# --- the cases ---------------------------------------------------------------------------------------

CASES: list[Case] = [
    Case(
        f"peers/convnext_{version}/{direction}",
        functools.cache(
            _convnext_case(v2=version == "v2", to_timm=direction == "reference_to_timm")
        ),
        framework=FW,
    )
    for version in ("v1", "v2")
    for direction in ("reference_to_timm", "timm_to_reference")
]
