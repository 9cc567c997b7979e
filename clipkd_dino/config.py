"""Typed configuration: dataclasses, YAML files and dotted `key=value` overrides.

Every error names the offending key (or file) in one line and is raised as `ConfigError` before any heavy work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from clipkd_dino.data.faults import check_max_bad_fraction
from clipkd_dino.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "toy-teacher"  # an open_clip architecture or a shipped config (clipkd_dino/models/model_configs)
    pretrained: str | None = None  # local checkpoint file to start from


@dataclass
class DataConfig:
    train: str = ""  # CSV file or webdataset shards (brace pattern, e.g. "shards/train-{000000..000009}.tar")
    format: str = "auto"  # auto | csv | webdataset ("auto": *.csv / *.tsv are CSV, anything else webdataset)
    epochs: str = "auto"  # webdataset: exact (each sample once an epoch) | resampled (shards drawn with
    # replacement, data.num_samples an epoch) | auto (exact when sizes.json lists every shard and num_samples is unset)
    num_samples: int | None = None  # webdataset, resampled epochs: samples an epoch (default: the sum of sizes.json)
    csv_separator: str = "\t"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    augment: bool = True  # RandomResizedCrop(scale=crop_scale); False: resize + centre crop
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    workers: int = 2  # DataLoader workers per process
    prefetch: int = 2  # batches in flight per worker (in /dev/shm: workers x prefetch batches per process)
    worker_timeout: float = 600.0  # seconds a batch may take to arrive before the run stops with an error
    shuffle_buffer: int = 2000  # webdataset sample shuffle buffer
    val_retrieval: str | None = None  # retrieval JSONL evaluated at epoch ends
    val_zeroshot: str | None = None  # zero-shot directory evaluated at epoch ends
    max_bad_fraction: float | None = None  # stop once more than this share of the samples read was bad (None: never)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1  # not applied to gains, biases and the logit scale
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 10000  # optimiser steps of linear warm-up, then cosine decay to 0
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    accum_steps: int = 1  # micro-batches per optimiser step; the contrastive terms see all of them (accum_freq)


@dataclass
class TrainConfig:
    epochs: int = 32
    batch_size: int = 128  # per process and micro-batch; the global batch is batch_size x processes
    precision: str = "fp32"  # fp32 | bf16 (CPU or CUDA) | fp16 (CUDA, with loss scaling)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    seed: int = 0
    output_dir: str = "runs/clip"
    checkpoint_every_steps: int = 0  # also save `latest` every N optimiser steps (0: at epoch ends only)
    log_every_steps: int = 10
    eval_every_epochs: int = 1  # 0: evaluate only after the last epoch
    max_nonfinite_steps: int = 5  # steps with a non-finite loss are skipped; this many in a row stop the run
    shared_folder_timeout: float = 60.0  # seconds a rank waits to see a file another rank wrote in output_dir (and
    # without progress of its node's copy for distill.stage_dir)
    compile: bool = False  # run the objective (student, projectors, losses) under torch.compile
    compile_backend: str = "inductor"  # torch.compile's backend (e.g. aot_eager where inductor cannot build)


def recipe_weights() -> dict[str, float | None]:
    """The CLIP-KD recipe (task + CRD + ICL + FD) + the dino-loss; FD's null: 2000 x D / 512 (the recipe's 2000 was
    tuned at embed dim D = 512)."""
    return {"task": 1.0, "crd": 1.0, "icl": 1.0, "fd": None, "dino": 1.0}


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher: online (teacher + labels) or cached (the labelling pass's cache)."""

    teacher: str | None = None  # teacher architecture; None: no distillation (plain CLIP training)
    teacher_pretrained: str | None = None  # teacher checkpoint (online mode)
    teacher_precision: str = "fp32"  # fp32 | bf16: the frozen teacher's weights (bf16 is ~3x faster on AMX CPUs)
    labels: str | None = None  # `clipkd label` output folder: pseudo-labels and class means (needed by dino)
    cache: str | None = None  # `clipkd label --cache-views K` output folder: no teacher forward at all
    stage_dir: str | None = None  # node-local folder (e.g. $TMPDIR/clipkd) where each node copies cache and labels
    weights: dict[str, float | None] = field(default_factory=recipe_weights)  # per loss term (distill/terms.py;
    # 0 or absent: off); a file's keys replace the recipe's one by one
    dino_m: float = 0.0  # teacher-norm scale m
    dino_p: float = 2.0  # norm order p (inf allowed as .inf in YAML)
    dino_reduction: str = "sample"  # sample | class
    mask_ratio: float = 0.75  # MFD: share of patch tokens the student's masked image forward drops
    icl_init_scale: float = 14.285714  # ICL's learnable scale starts at 1 / 0.07 (stored as its log)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type = Config) -> Any:
    """Read a YAML file (or start from defaults when `path` is None) and apply `key.sub=value` overrides.

    A file may start from others: `base: FILE` or `base: [FILE, ...]` (paths relative to the file) are read first,
    in order, and the file's own keys override theirs section by section. `schema` is the top-level dataclass.
    """
    raw = read_config_tree(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    return _build(schema, raw, prefix="")


def read_config_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged mapping of `path` and its `base:` files (recursively); errors name the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files include each other")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = raw.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for base in bases:
        _merge(merged, read_config_tree(path.parent / base, seen + (path.resolve(),)))
    _merge(merged, raw)
    return merged


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value) if value.strip() else None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + str(unknown[0])!r} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        elif typing.get_origin(hint) is dict:  # a mapping's keys replace its default's one by one
            default = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory()
            values[name] = default | _coerce(value, hint, prefix + name)
        else:
            values[name] = _coerce(value, hint, prefix + name)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a simple type hint (str, int, float, bool, list[X], dict[str, X], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} must be {hint.__name__}, got {value!r}")
    return value


def check_values(config: Config) -> None:
    """Range and choice checks that the types alone do not express."""
    choices = {
        "data.format": (config.data.format, ("auto", "csv", "webdataset")),
        "train.precision": (config.train.precision, ("fp32", "bf16", "fp16")),
        "distill.teacher_precision": (config.distill.teacher_precision, ("fp32", "bf16")),
        "distill.dino_reduction": (config.distill.dino_reduction, ("sample", "class")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}; got {value!r}")
    check_max_bad_fraction(config.data.max_bad_fraction, "config key 'data.max_bad_fraction'")
    positive = {
        "train.max_nonfinite_steps": config.train.max_nonfinite_steps,
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "optim.accum_steps": config.optim.accum_steps,
        "optim.lr": config.optim.lr,
        "data.prefetch": config.data.prefetch,
    }
    non_negative = {
        "data.workers": config.data.workers,
        "data.worker_timeout": config.data.worker_timeout,
        "train.shared_folder_timeout": config.train.shared_folder_timeout,
        "optim.warmup_steps": config.optim.warmup_steps,
        "optim.weight_decay": config.optim.weight_decay,
        "train.checkpoint_every_steps": config.train.checkpoint_every_steps,
        "train.eval_every_epochs": config.train.eval_every_epochs,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value}")
    non_negative |= {f"distill.weights.{name}": weight or 0.0 for name, weight in config.distill.weights.items()}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value}")
    if len(config.optim.betas) != 2 or len(config.data.crop_scale) != 2:
        raise ConfigError("config keys 'optim.betas' and 'data.crop_scale' take two numbers each")
    if not config.data.train:
        raise ConfigError("config key 'data.train' is required (a CSV file or webdataset shards)")


def with_bad_fraction(args) -> list[str]:
    """The command line's overrides, plus `data.max_bad_fraction` when `--max-bad-fraction` was given."""
    extra = [] if args.max_bad_fraction is None else [f"data.max_bad_fraction={args.max_bad_fraction}"]
    return [*args.overrides, *extra]
