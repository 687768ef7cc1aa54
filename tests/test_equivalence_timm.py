"""torchvision <-> timm: the same architectures, written twice with different names and nesting.

Both libraries are PyTorch, so no axis changes: what is tested is pairing. ResNet-18 has the
same names on both sides (a baseline); MobileNetV2 renames everything (``features.3.conv.1.0``
vs ``blocks.1.1.conv_dw``) and is mostly BatchNorms of equal sizes; ConvNeXt interleaves
downsampling layers with stages differently (``features.2`` vs ``stages.1.downsample``) and
stores layer scale as (C, 1, 1) against timm's (C,); ViT has fused qkv projections under
different leaf names (``in_proj_weight`` vs ``qkv.weight``) and (1, N, D) position tables.

Needs torchvision (timm imports it), which is not a dependency of this project: the tests are
marked ``torchvision`` and skipped when it cannot be imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import weightbridge  # noqa: E402

pytestmark = [pytest.mark.torchvision, pytest.mark.torch]


def perturb(model: Any, seed: int) -> Any:
    """Every float tensor nudged away from its init (BN statistics too), so all are distinct."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                continue
            scale = float(t.std()) if t.numel() > 1 else 0.0
            t.add_(torch.randn(t.shape, generator=gen) * 0.1 * max(scale, 0.1))
    return model.eval()


def _tv_convnext() -> Any:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    blocks = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, 128, 2),
        CNBlockConfig(128, None, 1),
    ]
    return ConvNeXt(blocks, num_classes=10)


def _timm_convnext() -> Any:
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))


def _tv_vit() -> Any:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )


def _timm_vit() -> Any:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=10,
        global_pool="token",
    )


CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any], int]] = {
    "resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10),
        lambda: timm.create_model("resnet18", num_classes=10),
        32,
    ),
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        lambda: timm.create_model("mobilenetv2_100", num_classes=10),
        32,
    ),
    "convnext": (_tv_convnext, _timm_convnext, 32),
    "vit": (_tv_vit, _timm_vit, 32),
}


def _run(model: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("direction", ["torchvision_to_timm", "timm_to_torchvision"])
def test_torchvision_timm_same_outputs(name: str, direction: str) -> None:
    tv_factory, timm_factory, size = CASES[name]
    torch.manual_seed(0)
    if direction == "torchvision_to_timm":
        source, target = perturb(tv_factory(), seed=1), timm_factory().eval()
    else:
        source, target = perturb(timm_factory(), seed=1), tv_factory().eval()
    x = np.random.default_rng(2).standard_normal((2, 3, size, size)).astype(np.float32)
    want = _run(source, x)
    target.load_state_dict(weightbridge.adapt(source.state_dict(), target.state_dict()))
    np.testing.assert_allclose(
        _run(target, x), want, rtol=1e-4, atol=1e-5 + 1e-4 * float(np.abs(want).max())
    )
