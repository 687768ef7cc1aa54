"""Fine-tuning start: load a pretrained backbone into a model with a new classifier head.

The pretrained checkpoint has a 100-class head; your model has a 10-class one. `partial=True`
loads every tensor that fits and keeps your model's own values for the rest (read from your
checkpoint, so pass it as `target=` to both `convert` and `verify`). The command line is the
same: `weightbridge convert pretrained.safetensors --like mine.safetensors --partial -o out/`
then `weightbridge verify pretrained.safetensors out/ --like mine.safetensors`.

Run:   python examples/03_partial_load_new_head.py [WORKDIR]
Needs: pip install weightbridge torch
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

import weightbridge.api as wb


class Net(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3)
        self.head = torch.nn.Linear(16, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.conv2(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main(workdir: str) -> None:
    torch.manual_seed(0)
    pretrained = Net(classes=100).eval()
    with torch.no_grad():  # running statistics as training would leave them
        pretrained.bn1.running_mean.uniform_(-0.5, 0.5)
        pretrained.bn1.running_var.uniform_(0.5, 1.5)
    mine = Net(classes=10).eval()
    src = os.path.join(workdir, "pretrained.safetensors")
    target = os.path.join(workdir, "mine.safetensors")
    out = os.path.join(workdir, "out")
    save_file(pretrained.state_dict(), src)
    save_file(mine.state_dict(), target)

    plan = wb.plan(src, target, partial=True)
    print(plan.explain(), "\n")
    report = wb.convert(src, out, target=target, partial=True)
    print(report.summary())
    print(f"verified {wb.verify(src, out, target=target)} tensors")

    loaded = Net(classes=10).eval()
    loaded.load_state_dict(load_file(os.path.join(out, "model.safetensors")))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), pretrained.features(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.head.weight, mine.head.weight, rtol=0, atol=0)
        print(f"new head output shape: {tuple(loaded(x).shape)}")
    print("OK: the backbone computes the pretrained features; the 10-class head is mine")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
