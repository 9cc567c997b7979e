"""ResNet-50 for CIFAR (mdistiller / CRD "ResNet50": 3x3 stem without max-pool, bottleneck stages 64..512 x 4).

Parameter names and shapes equal those of RepDistiller `models/resnetv2.py` and mdistiller
`mdistiller/models/cifar/resnetv2.py` (`shortcut`, `linear`), so their teacher checkpoints load strictly.
Fix: the references report `stage_channels` [256, 512, 1024, 2048] for five feature maps; here it lists the
stem too, [64, 256, 512, 1024, 2048], so it matches "stages".
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from clipkd_dino.models.cnn.base import Classifier, ClassifierOutput, ResidualStage, init_weights, staged_forward

EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, with a 1x1 conv + BN `shortcut` where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = EXPANSION * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(preact), preact


class CifarResNetV2(Classifier):
    """Stem then four bottleneck stages; "stages" = [stem, stage1, ..., stage4]."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, stages = 64, []
        for planes, blocks, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            strides = [stride] + [1] * (blocks - 1)
            stage = []
            for s in strides:
                stage.append(Bottleneck(in_planes, planes, s))
                in_planes = EXPANSION * planes
            stages.append(ResidualStage(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes
        self.stage_channels = [64] + [EXPANSION * p for p in (64, 128, 256, 512)]
        init_weights(self)

    def forward(self, x: Tensor) -> ClassifierOutput:
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        return staged_forward(F.relu(self.bn1(self.conv1(x))), layers, self.linear)
