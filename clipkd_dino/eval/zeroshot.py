"""Zero-shot classification: the prompt-ensemble classifier, top-1/top-5 accuracy, and the data-set reader.

Classifier (CLIP/open_clip recipe): per class, encode every template, L2-normalise each embedding, average them,
re-normalise. Logits = 100 * normalised image features @ classifier.
Tie rule, as in retrieval: a sample is correct at K when fewer than K other classes score >= its true class.

Data set directory: `classnames.json` (list of names, index = class), `templates.json` (list of strings with "{}",
replaced by the class name), `samples.csv` (tab-separated, header with `filepath` and `label`, paths relative to the
directory, integer labels).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from clipkd_dino.errors import UserError
from clipkd_dino.eval.encode import Tokenizer, encode_texts

LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class ZeroShotSet:
    """A zero-shot data set, read: class names, templates, image paths (absolute) and their labels."""

    root: Path
    classnames: list[str]
    templates: list[str]
    images: list[Path]
    labels: list[int]


def zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
) -> torch.Tensor:
    """Unit class embeddings from the prompt ensemble: [D, num_classes] float32 on the CPU."""
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    features = encode_texts(model, tokenizer, prompts, device, precision, batch_size)
    per_class = F.normalize(features, dim=-1).reshape(len(classnames), len(templates), -1)
    return F.normalize(per_class.mean(dim=1), dim=-1).T


def zeroshot_accuracy(
    image_features: torch.Tensor, labels: Sequence[int] | torch.Tensor, classifier: torch.Tensor
) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy in percent (top-5 = top-C when there are C < 5 classes) and the sample count.

    image_features [N, D] (normalised here), labels [N], classifier [D, C] from `zeroshot_classifier`.
    """
    logits = LOGIT_SCALE * F.normalize(image_features.float(), dim=-1) @ classifier
    labels = torch.as_tensor(labels, dtype=torch.long)
    true = logits.gather(1, labels[:, None])
    wrong = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    ranks = ((logits >= true) & wrong).sum(dim=1)
    top5 = min(5, classifier.shape[1])
    return {
        "top1": 100.0 * int((ranks < 1).sum()) / len(labels),
        "top5": 100.0 * int((ranks < top5).sum()) / len(labels),
        "num_samples": len(labels),
    }


def read_zeroshot_dir(root: str | Path) -> ZeroShotSet:
    """Read a zero-shot data set directory; a one-line UserError names the file (and line) on any problem."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"zero-shot directory not found: {root}")
    classnames = _read_string_list(root / "classnames.json")
    templates = _read_string_list(root / "templates.json")
    bad = [template for template in templates if "{}" not in template]
    if bad:
        raise UserError(f"{root / 'templates.json'}: template without '{{}}': {bad[0]!r}")
    images, labels = _read_samples(root / "samples.csv", len(classnames))
    return ZeroShotSet(root, classnames, templates, images, labels)


def _read_string_list(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise UserError(f"{path}: expected a non-empty JSON list of strings")
    return value


def _read_samples(path: Path, num_classes: int) -> tuple[list[Path], list[int]]:
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    images, labels = [], []
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        missing = {"filepath", "label"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path}:1: header lacks column(s) {sorted(missing)} (expected 'filepath<TAB>label')")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            images.append(_sample_image(row["filepath"], path.parent, where))
            labels.append(_sample_label(row["label"], num_classes, where))
    if not images:
        raise UserError(f"{path}: no samples")
    return images, labels


def _sample_image(filepath: str | None, root: Path, where: str) -> Path:
    if not filepath:
        raise UserError(f"{where}: empty filepath")
    image = root / filepath
    if not image.is_file():
        raise UserError(f"{where}: image file not found: {image}")
    return image


def _sample_label(label: str | None, num_classes: int, where: str) -> int:
    try:
        value = int(label or "")
    except ValueError:
        raise UserError(f"{where}: label must be an integer, got {label!r}") from None
    if not 0 <= value < num_classes:
        raise UserError(f"{where}: label {value} outside [0, {num_classes}) (classes in classnames.json)")
    return value
