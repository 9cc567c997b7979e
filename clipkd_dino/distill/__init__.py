"""Distillation objectives: a frozen teacher (online or cached) and the CLIP-KD losses plus the dino-loss."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clipkd_dino.config import Config
from clipkd_dino.distill.distiller import CLIPDistiller
from clipkd_dino.errors import ConfigError


def check_distill(config: Config) -> None:
    """Cheap checks of the `distill:` section (files, modes, compatibility of student and teacher)."""
    from clipkd_dino.models.factory import check_pretrained, model_config

    cfg = config.distill
    if cfg.teacher is None:
        return
    teacher, student = model_config(cfg.teacher), model_config(config.model.name)
    if cfg.cache is None:
        check_pretrained(cfg.teacher_pretrained)
        for part, key in (("vision_cfg", "image_size"), ("text_cfg", "context_length"), ("text_cfg", "vocab_size")):
            if teacher[part].get(key) != student[part].get(key):
                raise ConfigError(f"config key 'distill.teacher': the online teacher needs the student's {key} "
                                  f"({teacher[part].get(key)} != {student[part].get(key)}); use a cache instead")
    elif not (Path(cfg.cache) / "cache" / "manifest.json").is_file():
        raise ConfigError(f"config key 'distill.cache': no teacher cache in {cfg.cache} "
                          "(run `clipkd label --cache-views K --out DIR`)")
    labels = cfg.labels or cfg.cache
    if (cfg.weights.dino or cfg.weights.dino_text) and not (labels and (Path(labels) / "labels.tsv").is_file()):
        raise ConfigError(f"config key 'distill.labels': the dino-loss needs the output folder of `clipkd label` "
                          f"(labels.tsv not found in {labels})")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"config key 'distill.mask_ratio' must be in (0, 1), got {cfg.mask_ratio}")


def build_objective(config: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """CLIPObjective for plain training, CLIPDistiller when `distill.teacher` is set."""
    from clipkd_dino.models.factory import model_config
    from clipkd_dino.train.objectives import CLIPObjective

    cfg = config.distill
    if cfg.teacher is None:
        return CLIPObjective(model).to(device)
    from clipkd_dino.distill.teachers import CachedTeacher, OnlineTeacher
    from clipkd_dino.teacher import load_labels

    teacher = (CachedTeacher(cfg.cache) if cfg.cache else
               OnlineTeacher(cfg.teacher, cfg.teacher_pretrained, cfg.teacher_precision, device))
    labels_dir = cfg.labels or cfg.cache
    labels = load_labels(labels_dir) if labels_dir and (cfg.weights.dino or cfg.weights.dino_text) else None
    distiller = CLIPDistiller(model, teacher, cfg, int(model_config(config.model.name)["embed_dim"]),
                              labels.class_means if labels else None,
                              labels.text_class_means if labels else None, labels)
    return distiller.to(device)
