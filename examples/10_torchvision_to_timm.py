"""A torchvision ResNet checkpoint (`torch.save` of its state dict) -> timm's ResNet.

The `.pth` file is read without running its pickle (weightbridge's restricted reader), and the
target is the timm module itself (names and shapes only). timm's ResNet keeps torchvision's
names, so this pair is matched by name; the same two lines convert between families that name
things differently (see the corpus in tests/corpus for 30 torchvision <-> timm pairs). The
converted file loads with `load_state_dict`, and the timm model gives torchvision's outputs.

Run:   python examples/10_torchvision_to_timm.py [WORKDIR]
Needs: pip install 'weightbridge[torch]' torchvision timm
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import timm
import torch
import torchvision
from safetensors.torch import load_file

import weightbridge.api as wb


def main(workdir: str) -> None:
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics, not the 0/1 of a new model
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    pth = os.path.join(workdir, "resnet18.pth")
    torch.save(theirs.state_dict(), pth)

    mine = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    out = os.path.join(workdir, "timm")
    report = wb.convert(pth, out, target=mine)
    print(report.summary())
    print("verified:", wb.verify(pth, out, target=mine), "tensors equal to the source")
    mine.load_state_dict(load_file(os.path.join(out, "model.safetensors")))

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64), np.float32))
    with torch.no_grad():
        want, got = theirs(x).numpy(), mine(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    diff = float(np.abs(got - want).max())
    print(f"OK: timm's resnet18 computes what torchvision's does (max |difference| {diff:.1e})")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
