"""`clipkd cls centers`: the teacher's class means of its pooled penultimate features over the training set.

Every training image is seen once, without augmentation. With `correct_only`, only the images the teacher classifies
correctly count (KD++ paper, appendix B.6); a class with none of those falls back to all its images. Unreadable
images are skipped and counted per reason (`data.max_bad_fraction` applies). Stored like
the CLIP path's class means (`class_means.safetensors` + `class_means.json`), so `distill.class_means` reads
either, and KD++'s own centre JSON too.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm import tqdm

from clipkd_dino.classify.config import ClsConfig, check_cls_config
from clipkd_dino.classify.data import build_data, collate_classification
from clipkd_dino.data.faults import enforce_bad_fraction
from clipkd_dino.data.loader import batches as loader_batches
from clipkd_dino.data.loader import data_loader
from clipkd_dino.errors import UserError
from clipkd_dino.runtime import autocast, resolve_device
from clipkd_dino.teacher.class_means import ClassMeans, ClassSums, load_class_means, save_class_means


def load_teacher(config: ClsConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The frozen teacher in eval mode, weights from `model.teacher_pretrained` (a file or a library weights tag)."""
    from clipkd_dino.models.cnn import create_classifier, load_classifier_weights
    from clipkd_dino.models.cnn.weights import resolve_classifier_weights

    teacher = create_classifier(config.model.teacher, num_classes)
    load_classifier_weights(teacher, resolve_classifier_weights(config.model.teacher, config.model.teacher_pretrained))
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


@torch.no_grad()
def teacher_class_means(teacher: nn.Module, loader: Iterable, num_classes: int, correct_only: bool,
                        device: torch.device, precision: str = "fp32",
                        skipped: Counter | None = None) -> tuple[ClassSums, list[int], float]:
    """The teacher's pooled features summed per true class, the classes that fell back, its top-1 (%).

    With `correct_only`, only correctly classified images count; a class without any falls back to all its images
    (listed in the second value) rather than to a zero mean. Unreadable images are counted per reason in `skipped`.
    """
    every, correct = ClassSums(num_classes, teacher.feature_dim, device), ClassSums(num_classes, teacher.feature_dim,
                                                                                    device)
    for images, targets, bad in tqdm(loader, desc="class means", unit="batch", dynamic_ncols=True):
        if skipped is not None:
            skipped.update(bad)
        if not len(targets):
            continue
        images, targets = images.to(device), targets.to(device)
        with autocast(device, precision):
            out = teacher(images)
        pooled = out["pooled"].float()
        every.add(pooled, targets)
        correct.add(pooled, torch.where(out["logits"].argmax(dim=1) == targets, targets, -1))
    accuracy = 100.0 * float(correct.counts.sum()) / max(int(every.counts.sum()), 1)
    if not correct_only:
        return every, [], accuracy
    fallback = (correct.counts == 0).nonzero().flatten()
    correct.sums[fallback], correct.counts[fallback] = every.sums[fallback], every.counts[fallback]
    return correct, fallback.tolist(), accuracy


def compute_centers(config: ClsConfig) -> dict[str, Any]:
    """Compute and store the teacher's class means as `config` says; returns the sidecar's summary."""
    check_cls_config(config, for_training=False)
    device = resolve_device(config.train.device)
    data = build_data(config.data.dataset, config.data.root, config.data.train_limit, config.train.seed)
    teacher = load_teacher(config, data.num_classes, device)
    loader = loader_batches(data_loader(data.train_plain, workers=config.data.workers,
                                        batch_size=config.train.batch_size, collate_fn=collate_classification),
                            "the data loader's timeout")
    skipped: Counter = Counter(data.skipped_at_load)
    sums, fallback, accuracy = teacher_class_means(teacher, loader, data.num_classes, config.centers.correct_only,
                                                   device, config.train.precision, skipped)
    seen = len(data.train_plain) + sum(data.skipped_at_load.values())
    enforce_bad_fraction(skipped, seen, config.data.max_bad_fraction, "data (training split)", final=True)
    if fallback:
        print(f"warning: the teacher classifies no training image of {len(fallback)} class(es) correctly "
              f"({', '.join(data.class_names[c] for c in fallback[:5])}...): their means use all their images",
              file=sys.stderr)
    out = Path(config.centers.out or Path(config.train.output_dir) / "centers")
    summary = {"teacher": config.model.teacher, "teacher_pretrained": config.model.teacher_pretrained,
               "dataset": config.data.dataset, "correct_only": config.centers.correct_only,
               "images": int(sums.counts.sum()), "teacher_train_top1": round(accuracy, 3),
               "classes_with_all_images": [data.class_names[c] for c in fallback],
               "skipped": dict(sorted(skipped.items())), "seen": seen}
    save_class_means(out, ClassMeans(sums.means().cpu(), sums.counts.cpu(), data.class_names), summary)
    return {**summary, "out": str(out)}


def read_centers(path: str, num_classes: int, dim: int) -> torch.Tensor:
    """Class means [num_classes, dim] from `path`; an error names the file when the shape does not fit."""
    means = load_class_means(path).image
    if tuple(means.shape) != (num_classes, dim):
        raise UserError(f"class means {path}: shape {tuple(means.shape)}, the teacher needs ({num_classes}, {dim})")
    return means
