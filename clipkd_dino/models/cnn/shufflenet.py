"""ShuffleNetV1 (groups 3) and ShuffleNetV2 (1x) for CIFAR, as in CRD / mdistiller ("ShuffleV1", "ShuffleV2").

Parameter names and shapes equal those of RepDistiller `models/ShuffleNetv1.py` / `ShuffleNetv2.py` and
mdistiller `mdistiller/models/cifar/ShuffleNetv1.py` / `ShuffleNetv2.py`, so their checkpoints load strictly.
Both use a 1x1 stem without downsampling; "stages" = [stem, stage1, stage2, stage3].
Fixes (no parameter changes): ShuffleNetV2's references return the pre-ReLU map of a stage's last block
without the channel shuffle applied to its output, so its channels do not line up with "stages"; here the
shuffle is applied to both, and ReLU(preact) equals the stage output. mdistiller reports no stage channels for
ShuffleNetV1; here they are [24, 240, 480, 960].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipkd_dino.models.cnn.base import (Classifier, ClassifierOutput, ResidualStage, classifier_output, global_pool,
                                         staged_forward)

STEM = 24


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[B, C, H, W] -> [B, g, C/g, H, W] -> transpose the group axes -> [B, C, H, W]."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an average-pooled shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        self.first_groups = 1 if in_planes == STEM else groups  # the stem is too narrow to group
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            preact = out + x
        return F.relu(preact), preact


class ShuffleNetV1(Classifier):
    def __init__(self, num_classes: int, out_planes: tuple[int, ...] = (240, 480, 960),
                 num_blocks: tuple[int, ...] = (4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        in_planes, stages = STEM, []
        for planes, blocks in zip(out_planes, num_blocks):
            # the first block's branch makes `planes - in_planes` channels; the pooled input fills up the rest
            stage = [ShuffleV1Block(in_planes, planes - in_planes, 2, groups)]
            stage += [ShuffleV1Block(planes, planes, 1, groups) for _ in range(blocks - 1)]
            stages.append(ResidualStage(*stage))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes
        self.stage_channels = [STEM, *out_planes]

    def forward(self, x: Tensor) -> ClassifierOutput:
        return staged_forward(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3), self.linear)


class ShuffleV2Block(nn.Module):
    """Split the channels in half; 1x1, depthwise 3x3, 1x1 on one half; concatenate and shuffle (groups 2)."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kept, branch = x.chunk(2, dim=1)
        branch = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(branch)))))))
        out = channel_shuffle(torch.cat([kept, F.relu(branch)], 1), 2)
        preact = channel_shuffle(torch.cat([kept, branch], 1), 2)
        return out, preact


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: a depthwise-then-1x1 branch and a 1x1-depthwise-1x1 branch, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(Classifier):
    """Each stage is `[ShuffleV2Down, ShuffleV2Block x n]`; a 1x1 conv to `feature_dim` precedes pooling."""

    def __init__(self, num_classes: int, out_channels: tuple[int, ...] = (116, 232, 464, 1024),
                 num_blocks: tuple[int, ...] = (3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        in_channels, stages = STEM, []
        for channels, blocks in zip(out_channels, num_blocks):
            stages.append(nn.Sequential(ShuffleV2Down(in_channels, channels),
                                        *(ShuffleV2Block(channels) for _ in range(blocks))))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(in_channels, out_channels[-1], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[-1])
        self.linear = nn.Linear(out_channels[-1], num_classes)
        self.feature_dim = out_channels[-1]
        self.stage_channels = [STEM, *out_channels[:-1]]

    def forward(self, x: Tensor) -> ClassifierOutput:
        stem = F.relu(self.bn1(self.conv1(x)))
        stages, preacts = [stem], [stem]
        out = stem
        for layer in (self.layer1, self.layer2, self.layer3):
            down, *blocks = layer
            out = down(out)
            for block in blocks:
                out, preact = block(out)
            stages.append(out)
            preacts.append(preact)
        pooled = global_pool(F.relu(self.bn2(self.conv2(out))))
        return classifier_output(self.linear(pooled), pooled, stages, preacts)
