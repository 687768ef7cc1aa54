"""torchvision <-> timm: the same architectures written twice, in both directions.

Every pair was checked once to compute the same function (by loading one into the other with a
hand map); hyperparameters one library fixes and the other exposes are set to agree (BatchNorm
eps of the MobileNetV3s, the VGG head width, the small configs of the transformers and ConvNeXt).
Models are built lazily inside `build`, random init only, the source perturbed so every tensor
(BatchNorm statistics included) is distinct. Inputs are small (64x64 or 80x80, batch 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tests.corpus.harness import Case, Pair, torch_pair

FW = ("torch", "torchvision")
NUM_CLASSES = 10


def _tv(name: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kw)

    return make


def _timm(name: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw)

    return make


# --- models whose configuration is changed or built from the classes ------------------------------

VGG_HIDDEN = 512  # torchvision hardwires 4096 for fc6; a narrower head keeps the corpus light


def _tv_vgg(name: str) -> Callable[[], Any]:
    def make() -> Any:
        import torch.nn as nn
        import torchvision

        m = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
        m.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, VGG_HIDDEN),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(VGG_HIDDEN, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, NUM_CLASSES),
        )
        return m

    return make


def _timm_vgg(name: str) -> Callable[[], Any]:
    return _timm(name, mlp_ratio=VGG_HIDDEN / 4096)


def _tv_convnext() -> Any:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    blocks = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, 128, 2),
        CNBlockConfig(128, None, 1),
    ]
    return ConvNeXt(blocks, num_classes=NUM_CLASSES)


def _timm_convnext() -> Any:
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(num_classes=NUM_CLASSES, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))


def _tv_vit() -> Any:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=NUM_CLASSES,
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
        num_classes=NUM_CLASSES,
        global_pool="token",
    )


# Feature maps 32, 16, 8, 4 for a window of 4: every stage a whole number of windows, so
# torchvision (which pads to whole windows) and timm (which shrinks the window) agree.
SWIN = dict(patch=2, embed=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=4, image=64)


def _tv_swin() -> Any:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[SWIN["patch"]] * 2,
        embed_dim=SWIN["embed"],
        depths=list(SWIN["depths"]),
        num_heads=list(SWIN["heads"]),
        window_size=[SWIN["window"]] * 2,
        num_classes=NUM_CLASSES,
    )


def _timm_swin() -> Any:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=SWIN["image"],
        patch_size=SWIN["patch"],
        embed_dim=SWIN["embed"],
        depths=SWIN["depths"],
        num_heads=SWIN["heads"],
        window_size=SWIN["window"],
        num_classes=NUM_CLASSES,
    )


def _is_rel_index(name: str) -> bool:
    # torchvision stores Swin's constant relative_position_index buffers; timm computes them
    # (non-persistent). They are not weights: left out of the target, kept by the model.
    return name.endswith("relative_position_index")


def canonical_order(names: list[str]) -> list[str]:
    """Float tensor names in an order in which both libraries' tensors line up one to one.

    Definition order already does, except for three torchvision modules: RegNet defines a
    block's shortcut (``proj``) before its body (``f``; timm: ``downsample`` last), ViT its
    position table after the patch projection (timm: before), and Swin's patch merging its
    ``reduction`` before its ``norm`` (timm: after). Used for `Pair.reference` only (the
    diagnosis of mispairings), never given to the matcher.
    """
    out = list(names)
    if "encoder.pos_embedding" in out:
        out.remove("encoder.pos_embedding")
        out.insert(1, "encoder.pos_embedding")

    def moved_last(group_re: str, last_re: str) -> None:
        groups: dict[str, list[str]] = {}
        for n in out:
            m = re.match(group_re, n)
            if m:
                groups.setdefault(m.group(0), []).append(n)
        for members in groups.values():
            late = [n for n in members if re.search(last_re, n)]
            if not late:
                continue
            start = out.index(members[0])
            rest = [n for n in members if n not in late]
            out[start : start + len(members)] = rest + late

    moved_last(r"trunk_output\.block\d+\.block\d+-\d+\.", r"\.proj\.")
    moved_last(r"features\.\d+\.(?=reduction|norm)", r"\.reduction\.")
    return out


# --- the table --------------------------------------------------------------------------------

# (name, torchvision factory, timm factory, input size, extra torch_pair keyword arguments)
ARCHS: list[tuple[str, Callable[[], Any], Callable[[], Any], int, dict[str, Any]]] = [
    ("resnet18", _tv("resnet18"), _timm("resnet18"), 64, {}),
    ("resnet34", _tv("resnet34"), _timm("resnet34"), 64, {}),
    ("resnet50", _tv("resnet50"), _timm("resnet50"), 64, {}),
    ("resnext50_32x4d", _tv("resnext50_32x4d"), _timm("resnext50_32x4d"), 64, {}),
    ("vgg11", _tv_vgg("vgg11"), _timm_vgg("vgg11"), 64, {}),
    ("vgg11_bn", _tv_vgg("vgg11_bn"), _timm_vgg("vgg11_bn"), 64, {}),
    ("densenet121", _tv("densenet121"), _timm("densenet121"), 64, {}),
    ("mobilenet_v2", _tv("mobilenet_v2"), _timm("mobilenetv2_100"), 64, {}),
    (
        "mobilenet_v3_large",
        _tv("mobilenet_v3_large"),
        _timm("mobilenetv3_large_100", bn_eps=1e-3),
        64,
        {},
    ),
    (
        "mobilenet_v3_small",
        _tv("mobilenet_v3_small"),
        _timm("mobilenetv3_small_100", bn_eps=1e-3),
        64,
        {},
    ),
    ("efficientnet_b0", _tv("efficientnet_b0"), _timm("efficientnet_b0"), 64, {}),
    ("mnasnet1_0", _tv("mnasnet1_0"), _timm("mnasnet_100"), 64, {}),
    ("regnet_x_800mf", _tv("regnet_x_800mf"), _timm("regnetx_008"), 64, {}),
    ("regnet_y_400mf", _tv("regnet_y_400mf"), _timm("regnety_004"), 64, {}),
    (
        "inception_v3",
        _tv("inception_v3", aux_logits=False, init_weights=False),
        _timm("inception_v3"),
        80,
        {},
    ),
    ("convnext", _tv_convnext, _timm_convnext, 32, {}),
    ("vit", _tv_vit, _timm_vit, 32, {}),
    ("swin", _tv_swin, _timm_swin, SWIN["image"], {"swin": True}),
]


def _builder(
    make_a: Callable[[], Any], make_b: Callable[[], Any], size: int, a_is_tv: bool, extra: dict
) -> Callable[[], Pair]:
    def build() -> Pair:
        kw: dict[str, Any] = {"reference_order": canonical_order}
        if extra.get("swin") and not a_is_tv:
            kw["drop_mine"] = _is_rel_index
        return torch_pair(make_a, make_b, (1, 3, size, size), **kw)

    return build


# Pairs whose honest answer from metadata is a refusal: same-shaped tensors that nothing but
# a position tells apart, and the two libraries put them in different positions (RegNet's
# shortcut is first in torchvision and last in timm, next to a same-shaped 1x1 conv), or number
# their blocks differently (MobileNetV3-Small's and MNASNet's stems against timm's stages).
REFUSED = {"mobilenet_v3_small", "mnasnet1_0", "regnet_x_800mf", "regnet_y_400mf"}

CASES: list[Case] = []
for _name, _tv_make, _timm_make, _size, _extra in ARCHS:
    _expect = "refused" if _name in REFUSED else "equal"
    CASES.append(
        Case(
            f"vision/{_name}/torchvision_to_timm",
            _builder(_tv_make, _timm_make, _size, True, _extra),
            expect=_expect,  # type: ignore[arg-type]
            framework=FW,
        )
    )
    CASES.append(
        Case(
            f"vision/{_name}/timm_to_torchvision",
            _builder(_timm_make, _tv_make, _size, False, _extra),
            expect=_expect,  # type: ignore[arg-type]
            framework=FW,
        )
    )
