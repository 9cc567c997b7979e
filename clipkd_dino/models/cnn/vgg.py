"""VGG with batch norm for CIFAR (vgg8, vgg13 = CRD / mdistiller "vgg8" / "vgg13", i.e. `vgg8_bn` / `vgg13_bn`).

Parameter names and shapes equal those of RepDistiller `models/vgg.py` and mdistiller
`mdistiller/models/cifar/vgg.py` (`block0` ... `block4` of conv-BN-ReLU with the last ReLU left out,
`classifier`), so their teacher checkpoints load strictly. As in the references, the fourth max-pool is applied
only to inputs larger than CIFAR's 32 px (the references test for exactly 64 px).
"""

from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor, nn

from clipkd_dino.models.cnn.base import Classifier, ClassifierOutput, classifier_output, global_pool, init_weights

CIFAR_SIZE = 32
CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv3x3-BN-ReLU per width, without the final ReLU (the forward pass applies it, keeping the pre-ReLU map)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(Classifier):
    """Five conv blocks separated by max-pools; "stages" = the five block outputs after ReLU."""

    def __init__(self, config: str, num_classes: int):
        super().__init__()
        widths = CONFIGS[config]
        in_channels = [3] + [w[-1] for w in widths[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            make_block(w, c) for w, c in zip(widths, in_channels))
        self.classifier = nn.Linear(widths[-1][-1], num_classes)
        self.feature_dim = widths[-1][-1]
        self.stage_channels = [w[-1] for w in widths]
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> ClassifierOutput:
        pool_last = x.shape[-1] > CIFAR_SIZE
        stem = F.relu(self.block0(x))
        stages, preacts = [stem], [stem]
        out = stem
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4)):
            if i < 3 or pool_last:
                out = F.max_pool2d(out, kernel_size=2, stride=2)
            preact = block(out)
            out = F.relu(preact)
            stages.append(out)
            preacts.append(preact)
        pooled = global_pool(out)
        return classifier_output(self.classifier(pooled), pooled, stages, preacts)
