"""MobileNetV2 for CIFAR at half width (CRD / mdistiller "MobileNetV2" = `mobile_half`: expansion 6, width 0.5).

Parameter names and shapes equal those of RepDistiller `models/mobilenetv2.py` and mdistiller
`mdistiller/models/cifar/mobilenetv2.py` (`conv1`, `blocks.i.j.conv.k`, `conv2`, `classifier.0`), so their
checkpoints load strictly. The last conv keeps 1280 channels at widths <= 1 (as in the references).
"Stages" are the stem and the outputs of block groups 1, 2, 4 and 6 (mdistiller's choice). Inverted residual
blocks end in a linear BN, so "preact_stages" equals "stages" (the references return no "preact_feats" here).
"""

from __future__ import annotations


from torch import Tensor, nn

from clipkd_dino.models.cnn.base import Classifier, ClassifierOutput, classifier_output, global_pool, init_weights

# (expansion, channels, blocks, first stride) per group; expansion None = the model's expansion ratio
SETTINGS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
            (None, 160, 3, 2), (None, 320, 1, 1)]
STAGE_GROUPS = (1, 2, 4, 6)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection (`conv`); residual when stride 1 and shapes agree."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(Classifier):
    """Stem conv (stride 2), seven inverted-residual groups, a 1x1 conv to `feature_dim`, then the classifier."""

    def __init__(self, num_classes: int, expansion: int = 6, width: float = 0.5):
        super().__init__()
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, channels, 3, 2)
        stage_channels = [channels]
        groups = []
        for group_expansion, out_channels, blocks, stride in SETTINGS:
            out_channels = int(out_channels * width)
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(InvertedResidual(channels, out_channels, s, group_expansion or expansion))
                channels = out_channels
            groups.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(groups)
        self.feature_dim = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, self.feature_dim, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.feature_dim, num_classes))
        self.stage_channels = stage_channels + [int(SETTINGS[g][1] * width) for g in STAGE_GROUPS]
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> ClassifierOutput:
        out = self.conv1(x)
        stages = [out]
        for i, group in enumerate(self.blocks):
            out = group(out)
            if i in STAGE_GROUPS:
                stages.append(out)
        pooled = global_pool(self.conv2(out))
        return classifier_output(self.classifier(pooled), pooled, stages)
