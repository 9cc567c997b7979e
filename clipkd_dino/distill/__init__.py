"""Distillation objectives: a frozen teacher (online or cached) and the CLIP-KD losses plus the dino-loss."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clipkd_dino.config import Config, DistillConfig
from clipkd_dino.distill.distiller import CLIPDistiller
from clipkd_dino.distill.provenance import check_coverage, check_provenance
from clipkd_dino.distill.terms import enabled_terms, reads
from clipkd_dino.errors import ConfigError


def check_distill(config: Config) -> None:
    """Cheap checks of the `distill:` section (files, modes, compatibility of student and teacher, provenance of the
    labels and the cache, and that they cover `data.train`)."""
    from clipkd_dino.models.loading import check_clip
    from clipkd_dino.teacher.labels import LABELS_FILE

    cfg = config.distill
    enabled_terms(cfg.weights)  # names every weight key
    if cfg.teacher is None:
        return
    if cfg.cache is None:
        check_clip(cfg.teacher, cfg.teacher_pretrained)
    elif not (Path(cfg.cache) / "cache" / "manifest.json").is_file():
        raise ConfigError(f"config key 'distill.cache': no teacher cache in {cfg.cache} "
                          "(run `clipkd label --cache-views K --out DIR`)")
    labels = labels_folder(cfg)
    if labels and not (Path(labels) / LABELS_FILE).is_file():
        raise ConfigError(f"config key 'distill.labels': the dino-loss needs the output folder of `clipkd label` "
                          f"({LABELS_FILE} not found in {labels})")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"config key 'distill.mask_ratio' must be in (0, 1), got {cfg.mask_ratio}")
    check_provenance(cfg, labels)
    for folder in dict.fromkeys(filter(None, (cfg.cache, labels))):
        check_coverage(config.data, folder)


def labels_folder(cfg: DistillConfig) -> str | None:
    """The labelling output the terms reading labels (the dino-losses) need (`distill.labels`, else the cache's
    folder); None when no such term is on."""
    return (cfg.labels or cfg.cache) if "labels" in reads(enabled_terms(cfg.weights)) else None


def build_objective(config: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """CLIPObjective for plain training, CLIPDistiller when `distill.teacher` is set; a distiller's
    `batch_targets` completes each batch in the loader workers (cache rows, labels)."""
    from clipkd_dino.models.factory import model_config
    from clipkd_dino.distill.objectives import CLIPObjective

    cfg = config.distill
    if cfg.teacher is None:
        return CLIPObjective(model).to(device)
    from clipkd_dino.distill.staging import local_inputs
    from clipkd_dino.distill.teachers import BatchTargets, CachedTeacher, OnlineTeacher
    from clipkd_dino.teacher import load_labels

    cfg = local_inputs(cfg, labels_folder(cfg), config.train.shared_folder_timeout)  # node-local copies, if asked
    teacher = (CachedTeacher(cfg.cache, model) if cfg.cache else
               OnlineTeacher(cfg.teacher, cfg.teacher_pretrained, cfg.teacher_precision, device, model))
    labels_dir = labels_folder(cfg)
    if not cfg.cache:
        check_provenance(cfg, labels_dir, teacher.digest)
    labels = load_labels(labels_dir) if labels_dir else None
    distiller = CLIPDistiller(model, teacher, cfg, int(model_config(config.model.name)["embed_dim"]),
                              labels.class_means if labels else None, labels.text_class_means if labels else None)
    cache = teacher.cache if cfg.cache else None
    distiller.batch_targets = BatchTargets(cache, labels) if cache or labels else None
    return distiller.to(device)
