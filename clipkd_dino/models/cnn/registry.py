"""Names -> constructors. Adding an architecture is one entry in `CIFAR_CLASSIFIERS` (or `ALIASES`).

Names are matched case-insensitively. "tv:NAME" builds a torchvision model, "timm:NAME" a timm model (both
without pretrained weights: load them with `load_classifier_weights`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from clipkd_dino.errors import ConfigError
from clipkd_dino.models.cnn.base import Classifier
from clipkd_dino.models.cnn.imagenet import TimmClassifier, TorchvisionClassifier
from clipkd_dino.models.cnn.mobilenetv2 import MobileNetV2
from clipkd_dino.models.cnn.resnet import CifarResNet
from clipkd_dino.models.cnn.resnetv2 import CifarResNetV2
from clipkd_dino.models.cnn.shufflenet import ShuffleNetV1, ShuffleNetV2
from clipkd_dino.models.cnn.vgg import VGG
from clipkd_dino.models.cnn.wrn import WideResNet

Constructor = Callable[..., Classifier]  # called as constructor(num_classes=...)
NARROW, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)

CIFAR_CLASSIFIERS: dict[str, Constructor] = {
    "resnet8": partial(CifarResNet, 8, NARROW),
    "resnet20": partial(CifarResNet, 20, NARROW),
    "resnet32": partial(CifarResNet, 32, NARROW),
    "resnet56": partial(CifarResNet, 56, NARROW),
    "resnet110": partial(CifarResNet, 110, NARROW),
    "resnet8x4": partial(CifarResNet, 8, WIDE),
    "resnet32x4": partial(CifarResNet, 32, WIDE),
    "wrn_16_2": partial(WideResNet, 16, 2),
    "wrn_40_1": partial(WideResNet, 40, 1),
    "wrn_40_2": partial(WideResNet, 40, 2),
    "vgg8": partial(VGG, "vgg8"),
    "vgg13": partial(VGG, "vgg13"),
    "mobilenetv2_half": MobileNetV2,
    "shufflev1": ShuffleNetV1,
    "shufflev2": ShuffleNetV2,
    "resnet50_cifar": partial(CifarResNetV2, (3, 4, 6, 3)),
}
# the CRD / mdistiller spellings
ALIASES = {"MobileNetV2": "mobilenetv2_half", "ShuffleV1": "shufflev1", "ShuffleV2": "shufflev2",
           "ResNet50": "resnet50_cifar"}
CLASSIFIER_NAMES: tuple[str, ...] = (*CIFAR_CLASSIFIERS, *ALIASES)
PREFIXES: dict[str, Constructor] = {"tv:": TorchvisionClassifier, "timm:": TimmClassifier}


def check_classifier_name(name: str, key: str) -> None:
    """ConfigError naming the config `key` unless `name` is a zoo name, a torchvision or a timm model (no build)."""
    library, _, architecture = name.partition(":")
    if library.lower() == "tv":
        import torchvision

        known = architecture in torchvision.models.list_models()
    elif library.lower() == "timm":
        import timm

        known = timm.is_model(architecture)
    else:
        known = name.lower() in {n.lower() for n in CLASSIFIER_NAMES}
    if not known:
        raise ConfigError(f"config key {key!r}: unknown classifier {name!r} (use one of {', '.join(CLASSIFIER_NAMES)}, "
                          "'tv:NAME' for torchvision or 'timm:NAME')")


def create_classifier(name: str, num_classes: int) -> Classifier:
    """A classifier (see `base.py` for its output dict) for `num_classes` classes, randomly initialised."""
    for prefix, constructor in PREFIXES.items():
        if name.lower().startswith(prefix):
            return constructor(name[len(prefix):], num_classes=num_classes)
    lowered = {key.lower(): key for key in CIFAR_CLASSIFIERS} | {a.lower(): t for a, t in ALIASES.items()}
    if name.lower() not in lowered:
        raise ConfigError(f"unknown classifier {name!r}: use one of {', '.join(CLASSIFIER_NAMES)}, "
                          f"'tv:NAME' (torchvision) or 'timm:NAME'")
    return CIFAR_CLASSIFIERS[lowered[name.lower()]](num_classes=num_classes)
