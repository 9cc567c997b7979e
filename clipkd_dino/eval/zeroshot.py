"""Zero-shot classification: the prompt-ensemble classifier, top-1/top-5 accuracy, and the data-set reader.

Classifier (CLIP/open_clip recipe): per class, encode every template, L2-normalise each embedding, average them,
re-normalise. Logits = 100 * normalised image features @ classifier.
Tie rule, as in retrieval: a sample is correct at K when fewer than K other classes score >= its true class.

Two data set layouts (`read_zeroshot` tells them apart by `samples.csv`):
- our directory: `classnames.json` (list of names, index = class), `templates.json` (list of strings with "{}",
  replaced by the class name), `samples.csv` (tab-separated, header with `filepath` and `label`, paths relative to
  the directory, integer labels);
- an image folder: one sub-folder per class, classes in sorted folder order. Class names come from a file (JSON list
  or one per line, in that order), else for ImageNet's 1000 WNID folders (n01440764, ...) from open_clip's
  `IMAGENET_CLASSNAMES` (sorted WNIDs = ImageNet's standard class index), else from the folder names. Templates
  come from a file, else OpenAI's 80 ImageNet templates (`OPENAI_IMAGENET_TEMPLATES`).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from clipkd_dino.data.samples import IMAGE_EXTENSIONS
from clipkd_dino.errors import UserError
from clipkd_dino.eval.encode import Tokenizer, encode_texts
from clipkd_dino.eval.sources import read_json

LOGIT_SCALE = 100.0
PROMPTS_PER_BLOCK = 8192  # prompts encoded before their classes are reduced (zeroshot_classifier)
WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class ZeroShotSet:
    """A zero-shot data set, read: class names, templates, image paths (absolute) and their labels; `skipped` names
    the images dropped by `without`, `problems` counts them by reason."""

    root: Path
    classnames: list[str]
    templates: list[str]
    images: list[Path]
    labels: list[int]
    image_ids: list[str]
    skipped: tuple[str, ...] = ()
    problems: dict[str, int] = field(default_factory=dict)

    def without(self, drop: Mapping[int, str]) -> "ZeroShotSet":
        """The set without the images at the indices of `drop` (recorded as skipped under the reason each index
        maps to)."""
        keep = [index for index in range(len(self.images)) if index not in drop]
        return replace(self, images=[self.images[i] for i in keep], labels=[self.labels[i] for i in keep],
                       image_ids=[self.image_ids[i] for i in keep],
                       skipped=self.skipped + tuple(self.image_ids[i] for i in sorted(drop)),
                       problems=dict(Counter(self.problems) + Counter(drop.values())))


def zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
) -> torch.Tensor:
    """Unit class embeddings from the prompt ensemble: [D, num_classes] float32 on the CPU.

    Classes are encoded a block at a time and reduced at once, so memory is [D, num_classes] plus one block's
    prompt features, not the features of every prompt (10,000 concepts x 12 templates x 512 dims: 245 MB)."""
    per_block = max(1, PROMPTS_PER_BLOCK // max(1, len(templates)))
    blocks = []
    for start in range(0, len(classnames), per_block):
        names = classnames[start:start + per_block]
        features = encode_texts(model, tokenizer, prompts(names, templates), device, precision, batch_size)
        blocks.append(classifier_from_features(features, len(names)))
    return torch.cat(blocks, dim=1)


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major: [c0 t0, c0 t1, ..., c1 t0, ...]."""
    return [template.replace("{}", name) for name in classnames for template in templates]


def classifier_from_features(prompt_features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[D, num_classes] unit class embeddings from the features of `prompts(...)`: normalise, average, normalise."""
    per_class = F.normalize(prompt_features.float(), dim=-1).reshape(num_classes, -1, prompt_features.shape[-1])
    return F.normalize(per_class.mean(dim=1), dim=-1).T


def zeroshot_accuracy(
    image_features: torch.Tensor, labels: Sequence[int] | torch.Tensor, classifier: torch.Tensor
) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy in percent (top-5 = top-C when there are C < 5 classes), the mean over classes of
    each class's top-1 recall (balanced accuracy, in percent, over the classes that have samples) and the sample count.

    image_features [N, D] (normalised here), labels [N], classifier [D, C] from `zeroshot_classifier`.
    """
    logits = LOGIT_SCALE * F.normalize(image_features.float(), dim=-1) @ classifier
    labels = torch.as_tensor(labels, dtype=torch.long)
    true = logits.gather(1, labels[:, None])
    wrong = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    ranks = ((logits >= true) & wrong).sum(dim=1)
    top5 = min(5, classifier.shape[1])
    per_class = torch.zeros(classifier.shape[1]).index_add_(0, labels, (ranks < 1).float())
    counts = torch.bincount(labels, minlength=classifier.shape[1])
    return {
        "top1": 100.0 * int((ranks < 1).sum()) / len(labels),
        "top5": 100.0 * int((ranks < top5).sum()) / len(labels),
        "mean_per_class_recall": 100.0 * (per_class[counts > 0] / counts[counts > 0]).mean().item(),
        "num_samples": len(labels),
    }


def read_zeroshot_dir(root: str | Path, check_images: bool = True) -> ZeroShotSet:
    """Read a zero-shot data set directory; a one-line UserError names the file (and line) on any problem, a missing
    image file included unless `check_images` is False (then `sources.check_images` meets it)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"zero-shot directory not found: {root}")
    classnames = _read_string_list(root / "classnames.json")
    templates = read_templates(root / "templates.json")
    names, labels = _read_samples(root / "samples.csv", len(classnames), check_images)
    return ZeroShotSet(root, classnames, templates, [root / name for name in names], labels, names)


def read_zeroshot(root: str | Path, classnames: str | Path | None = None,
                  templates: str | Path | None = None, check_images: bool = True) -> ZeroShotSet:
    """Our directory (with `samples.csv`) or an image folder; `classnames` / `templates` files override either's."""
    root = Path(root)
    if (root / "samples.csv").is_file():
        data = read_zeroshot_dir(root, check_images)
    else:
        data = read_image_folder(root)
    if classnames:
        names = read_names(classnames)
        if len(names) != len(data.classnames):
            raise UserError(f"{classnames}: {len(names)} class names for {len(data.classnames)} classes in {root}")
        data = replace(data, classnames=names)
    return replace(data, templates=read_templates(templates)) if templates else data


def read_image_folder(root: str | Path) -> ZeroShotSet:
    """One sub-folder per class (sorted), its image files (any depth, sorted) the class's samples."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"zero-shot directory not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root}: no class sub-folders (and no samples.csv)")
    names, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        names.extend(str(p.relative_to(root)) for p in files)
        labels.extend([label] * len(files))
    if not names:
        raise UserError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    templates = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    return ZeroShotSet(root, _folder_classnames(root, [f.name for f in folders]), templates,
                       [root / name for name in names], labels, names)


def read_names(path: str | Path) -> list[str]:
    """A JSON list of strings, or one string per non-empty line."""
    path = Path(path)
    if path.suffix == ".json":
        return _read_string_list(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path}: empty")
    return lines


def read_templates(path: str | Path) -> list[str]:
    templates = read_names(path)
    bad = [template for template in templates if "{}" not in template]
    if bad:
        raise UserError(f"{path}: template without '{{}}': {bad[0]!r}")
    return templates


def _folder_classnames(root: Path, folders: list[str]) -> list[str]:
    wnids = [name for name in folders if WNID.fullmatch(name)]
    if not wnids:
        return [name.replace("_", " ") for name in folders]
    if len(wnids) != len(IMAGENET_CLASSNAMES) or len(wnids) != len(folders):
        raise UserError(f"{root}: {len(wnids)} ImageNet WNID folders among {len(folders)}: the ImageNet class names "
                        f"need all {len(IMAGENET_CLASSNAMES)} (sorted WNIDs = class index); give a class-names file")
    return list(IMAGENET_CLASSNAMES)


def _read_string_list(path: Path) -> list[str]:
    value = read_json(path)
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise UserError(f"{path}: expected a non-empty JSON list of strings")
    return value


def _read_samples(path: Path, num_classes: int, check_images: bool) -> tuple[list[str], list[int]]:
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
            images.append(_sample_image(row["filepath"], path.parent, where, check_images))
            labels.append(_sample_label(row["label"], num_classes, where))
    if not images:
        raise UserError(f"{path}: no samples")
    return images, labels


def _sample_image(filepath: str | None, root: Path, where: str, check_image: bool) -> str:
    if not filepath:
        raise UserError(f"{where}: empty filepath")
    if check_image and not (root / filepath).is_file():
        raise UserError(f"{where}: image file not found: {root / filepath}")
    return filepath


def _sample_label(label: str | None, num_classes: int, where: str) -> int:
    try:
        value = int(label or "")
    except ValueError:
        raise UserError(f"{where}: label must be an integer, got {label!r}") from None
    if not 0 <= value < num_classes:
        raise UserError(f"{where}: label {value} outside [0, {num_classes}) (classes in classnames.json)")
    return value
