"""Wide ResNets for CIFAR (wrn_16_2, wrn_40_1, wrn_40_2), as in CRD / mdistiller.

Parameter names and shapes equal those of RepDistiller `models/wrn.py` and mdistiller
`mdistiller/models/cifar/wrn.py` (`block1.layer.0.bn1`, `convShortcut`, a final `bn1`, `fc`), so their teacher
checkpoints load strictly. Blocks are pre-activation (BN-ReLU-conv): a stage's output has no ReLU, and its
pre-ReLU version is the next BN applied to it, i.e. the next stage's first `bn1` (the head's `bn1` for the
last stage). The references recompute those BNs after the forward pass, which in training mode updates their
running statistics a second time per step; here each is computed once, inside the forward pass, and reused.
Dropout (0 in every reference configuration) is left out.
"""

from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor, nn

from clipkd_dino.models.cnn.base import Classifier, ClassifierOutput, classifier_output, global_pool, init_weights


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; where the shape changes the shortcut is a 1x1 conv of the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor, normed: Tensor | None = None) -> Tensor:
        """`normed` is `self.bn1(x)` when the caller has already computed it."""
        act = F.relu(self.bn1(x) if normed is None else normed)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideStage(nn.Module):
    """`layer`: the blocks of one stage. Returns (output, the first block's `bn1` of the input)."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(WideBlock(in_planes, out_planes, stride),
                                   *(WideBlock(out_planes, out_planes, 1) for _ in range(blocks - 1)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        first, *rest = self.layer
        normed = first.bn1(x)
        out = first(x, normed)
        for block in rest:
            out = block(out)
        return out, normed


class WideResNet(Classifier):
    """Stem conv then three wide stages; "stages" = [stem, stage1, stage2, stage3] (none ends in a ReLU)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(blocks, widths[0], widths[1], 1)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        self.stage_channels = widths
        init_weights(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> ClassifierOutput:
        f0 = self.conv1(x)
        f1, _ = self.block1(f0)
        f2, pre1 = self.block2(f1)
        f3, pre2 = self.block3(f2)
        pre3 = self.bn1(f3)
        pooled = global_pool(F.relu(pre3))
        return classifier_output(self.fc(pooled), pooled, [f0, f1, f2, f3], [f0, pre1, pre2, pre3])
