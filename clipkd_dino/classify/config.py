"""Typed configuration of the classification mode (`clipkd cls`): same YAML rules as the CLIP configs.

Published rows are small files over a recipe and a method (`base: [../recipe.yaml, ../methods/kd.yaml]`), see
configs/cls/README.md. Every error names the key and is raised before heavy work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from clipkd_dino.classify.data import check_data
from clipkd_dino.data.faults import check_max_bad_fraction
from clipkd_dino.errors import ConfigError

@dataclass
class ClsModelConfig:
    student: str = "resnet8x4"  # a name of clipkd_dino.models.cnn (CIFAR zoo, tv:NAME, timm:NAME)
    teacher: str | None = None  # None: train `student` alone (method vanilla), e.g. to make a teacher
    teacher_pretrained: str | None = None  # the teacher's weights: a file (CRD/mdistiller, torchvision, timm) or,
    # for tv:/timm: teachers, the library's weights tag (IMAGENET1K_V1, a1_in1k) read from its download cache


@dataclass
class ClsDataConfig:
    dataset: str = "cifar100"  # cifar100 | imagenet | digits | toyworld
    root: str = "data/cifar100"  # CIFAR-100 python folder, ImageNet folder (train/, val/), toyworld folder
    train_limit: int | None = None  # keep this many training images (a seeded subset); None: all
    workers: int = 2
    max_bad_fraction: float | None = None  # stop once more than this share of the images read was bad


@dataclass
class ClsOptimConfig:
    lr: float = 0.1  # per `reference_batch` images; scaled linearly with the global batch
    reference_batch: int | None = None  # None: the lr is used as given
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])  # epochs where the lr is x gamma
    gamma: float = 0.1
    lr_warmup_epochs: int = 0  # linear lr warm-up (per step) over the first epochs
    accum_steps: int = 1  # micro-batches of train.batch_size per optimiser step


@dataclass
class ClsTrainConfig:
    epochs: int = 240
    batch_size: int = 128  # per process
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    output_dir: str = "runs/cls"
    log_every_steps: int = 50
    max_nonfinite_steps: int = 5  # steps with a non-finite loss are skipped; this many in a row stop the run


@dataclass
class ClsDistillConfig:
    """The keys every method takes; `load_cls_config` adds each registered method's own options (e.g. kd_weight,
    temperature, dkd_alpha, review_mid_channels: the keyword-only parameters of the classes in
    classify/distillers.py)."""

    method: str = "kd"  # a key of classify.distillers.DISTILLERS; "++" = the same with dino_weight > 0
    ce_weight: float = 1.0
    warmup_epochs: float = 20.0  # linear warm-up of the KD-family term
    dino_weight: float = 0.0
    dino_m: float = 0.0
    dino_p: float = 2.0
    dino_warmup: bool = False  # also warm the dino term up
    class_means: str | None = None  # `clipkd cls centers` output (folder) or a KD++ centre JSON


@dataclass
class ClsCentersConfig:
    correct_only: bool = False  # only training images the teacher classifies correctly (KD++ paper B.6)
    out: str | None = None  # default: {train.output_dir}/centers


@dataclass
class PublishedTarget:
    top1: float | None = None  # the published top-1 this config reproduces
    source: str = ""


@dataclass
class ClsConfig:
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    optim: ClsOptimConfig = field(default_factory=ClsOptimConfig)
    train: ClsTrainConfig = field(default_factory=ClsTrainConfig)
    distill: ClsDistillConfig = field(default_factory=ClsDistillConfig)
    centers: ClsCentersConfig = field(default_factory=ClsCentersConfig)
    published: PublishedTarget = field(default_factory=PublishedTarget)


def load_cls_config(path: str | None, overrides: list[str] = ()) -> ClsConfig:
    from clipkd_dino.config import load_config

    return load_config(path, overrides, schema=cls_config_schema())


def cls_config_schema() -> type[ClsConfig]:
    """ClsConfig whose `distill:` section also takes every registered method's own options (names, types and
    defaults read from the distillers' `__init__`), so a new method needs no edit here."""
    from clipkd_dino.classify.distillers import config_options

    distill = dataclasses.make_dataclass("ClsDistillConfig", [
        (name, p.annotation, field(default=p.default)) for name, p in config_options().items()],
        bases=(ClsDistillConfig,))
    return dataclasses.make_dataclass("ClsConfig", [("distill", distill, field(default_factory=distill))],
                                      bases=(ClsConfig,))


def check_cls_config(config: ClsConfig, for_training: bool = True) -> None:
    """Values, model names and files, before any heavy work."""
    from clipkd_dino.classify.distillers import DISTILLERS, config_options
    from clipkd_dino.models.cnn import check_classifier_name
    from clipkd_dino.runtime import PRECISIONS

    distill, model = config.distill, config.model
    if distill.method not in DISTILLERS:
        raise ConfigError(f"config key 'distill.method' must be one of {', '.join(DISTILLERS)}; "
                          f"got {distill.method!r}")
    if config.train.precision not in PRECISIONS:
        raise ConfigError(f"config key 'train.precision' must be one of {', '.join(PRECISIONS)}")
    check_max_bad_fraction(config.data.max_bad_fraction, "config key 'data.max_bad_fraction'")
    for key, value in {"train.epochs": config.train.epochs, "train.batch_size": config.train.batch_size,
                       "optim.lr": config.optim.lr, "optim.accum_steps": config.optim.accum_steps,
                       "train.max_nonfinite_steps": config.train.max_nonfinite_steps}.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value}")
    floats = [name for name, p in config_options().items() if p.annotation is float and hasattr(distill, name)]
    for key in ("ce_weight", "warmup_epochs", "dino_weight", *floats):  # the methods' weights and temperatures
        if getattr(distill, key) < 0:
            raise ConfigError(f"config key 'distill.{key}' must be >= 0")
    if not (distill.dino_p >= 1 or math.isinf(distill.dino_p)):
        raise ConfigError("config key 'distill.dino_p' must be >= 1 (or .inf)")
    if sorted(config.optim.milestones) != config.optim.milestones:
        raise ConfigError("config key 'optim.milestones' must be increasing")
    check_data(config.data.dataset, config.data.root)
    check_classifier_name(model.student, "model.student")
    needs_teacher = DISTILLERS[distill.method].uses_teacher or distill.dino_weight > 0 or not for_training
    if needs_teacher and not model.teacher:
        raise ConfigError(f"config key 'model.teacher' is required (distill.method={distill.method!r})")
    if needs_teacher:
        check_classifier_name(model.teacher, "model.teacher")
    if needs_teacher and model.teacher_pretrained is None:
        raise ConfigError("config key 'model.teacher_pretrained' is required: a teacher must be trained")
    if needs_teacher:
        from clipkd_dino.models.cnn.weights import resolve_classifier_weights

        try:
            resolve_classifier_weights(model.teacher, model.teacher_pretrained, download=False)
        except ConfigError as error:
            raise ConfigError(f"config key 'model.teacher_pretrained': {error}") from None
    if for_training and distill.dino_weight > 0:
        if distill.class_means is None:
            raise ConfigError("config key 'distill.class_means' is required when distill.dino_weight > 0 "
                              "(make them with `clipkd cls centers CONFIG`)")
        if not _exists(distill.class_means):
            raise ConfigError(f"config key 'distill.class_means': not found: {distill.class_means}")


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()
