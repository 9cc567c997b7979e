"""CIFAR ResNets of depth 6n+2 (resnet8 ... resnet110, resnet8x4, resnet32x4), as in CRD / mdistiller.

Parameter names and shapes equal those of RepDistiller `models/resnet.py` and mdistiller
`mdistiller/models/cifar/resnet.py`, so their published `{"model": state_dict}` teachers load strictly.
Differences from the references (none changes a parameter): every block returns (output, pre-ReLU output),
not only a stage's last one; global pooling is adaptive instead of `AvgPool2d(8)`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from clipkd_dino.models.cnn.base import Classifier, ClassifierOutput, ResidualStage, init_weights, staged_forward


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a 1x1 conv + BN `downsample` where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        preact = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(preact), preact


class CifarResNet(Classifier):
    """Stem conv (3x3) then three stages at 32, 16 and 8 px; "stages" = [stem, stage1, stage2, stage3]."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        self.stage_channels = list(widths)
        init_weights(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> ResidualStage:
        rest = (BasicBlock(planes, planes) for _ in range(blocks - 1))
        return ResidualStage(BasicBlock(in_planes, planes, stride), *rest)

    def forward(self, x: Tensor) -> ClassifierOutput:
        return staged_forward(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3), self.fc)

