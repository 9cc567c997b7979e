"""Classification data: CIFAR-100 (its python folder), ImageNet (an image folder), and two offline sets that need no
download: scikit-learn's digits (1,797 real 8x8 scans) and toyworld's single-object images.

Small sets live in memory as uint8 tensors [N, 3, H, W]; augmentation runs on those tensors (no PIL round trip).
CIFAR-100's python format is a pickle: the one file type this project unpickles, because it is the only form the data
set is published in (docs/classification.md).

Image folders skip what they cannot read: `SafeImageFolder` returns a `Skipped(reason)` marker for a missing, empty
or corrupt image and `collate_classification` drops the markers from the batch and counts them per reason.
"""

from __future__ import annotations

import pickle
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from clipkd_dino.data.pairs import Skipped
from clipkd_dino.data.faults import BadSample, format_skipped, load_image
from clipkd_dino.errors import ConfigError, UserError

DATASETS = ("cifar100", "imagenet", "digits", "toyworld")
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_IMAGE_SIZE = 32  # digits and toyworld are resized to CIFAR's size so every CIFAR architecture applies
DIGITS_VAL_SHARE = 0.2


@dataclass
class ClsData:
    train: Dataset  # with augmentation
    train_plain: Dataset  # the same images with the evaluation transform (class means)
    val: Dataset
    class_names: list[str]
    skipped_at_load: Counter = field(default_factory=Counter)  # training samples dropped while reading into memory

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class TensorImages(Dataset):
    """uint8 images [N, 3, H, W] and int labels [N], with a tensor transform applied per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder whose items are (transformed image, class) or `Skipped(reason)` with reason
    "missing_image", "empty_file" or "bad_image" (truncated or corrupt; `samples.load_image`)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Skipped:
        path, target = self.samples[index]
        try:
            image = load_image(path).convert("RGB")
        except BadSample as bad:
            return Skipped(bad.reason)
        return self.transform(image), target


def collate_classification(batch: list) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """(images [N, ...], targets [N] long, {reason: count} of the `Skipped` items dropped) from a list of
    (image, class) items; an all-bad batch gives N = 0."""
    valid = [item for item in batch if not isinstance(item, Skipped)]
    skipped = Counter(item.reason for item in batch if isinstance(item, Skipped))
    images = torch.stack([image for image, _ in valid]) if valid else torch.empty(0)
    return images, torch.tensor([int(target) for _, target in valid], dtype=torch.long), dict(skipped)


def check_data(dataset: str, root: str) -> None:
    """Cheap checks before any heavy work; errors name the config key and the path."""
    if dataset not in DATASETS:
        raise ConfigError(f"config key 'data.dataset' must be one of {', '.join(DATASETS)}; got {dataset!r}")
    if dataset == "digits":
        return
    path = Path(root)
    needed = {
        "cifar100": [_cifar_dir(path) / name for name in ("train", "test", "meta")],
        "imagenet": [path / "train", path / "val"],
        "toyworld": [path / "toyworld.json"],
    }[dataset]
    missing = [p for p in needed if not p.exists()]
    if missing:
        hint = {
            "cifar100": "put the python version of CIFAR-100 (the folder cifar-100-python with train, test, meta) "
                        "in it or under it",
            "imagenet": "it must hold train/ and val/ with one sub-folder per class",
            "toyworld": "generate it with `clipkd toyworld --out DIR`",
        }[dataset]
        raise ConfigError(f"config key 'data.root': {missing[0]} not found ({dataset}: {hint})")


def build_data(dataset: str, root: str, train_limit: int | None = None, seed: int = 0) -> ClsData:
    """The train and validation splits of `dataset`; `train_limit` keeps the first N of a seeded train shuffle."""
    check_data(dataset, root)
    data = {"cifar100": _cifar100, "imagenet": _imagenet, "digits": _digits, "toyworld": _toyworld}[dataset](root)
    if train_limit is not None and train_limit < len(data.train):
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:train_limit].tolist()
        data.train = torch.utils.data.Subset(data.train, order)
        data.train_plain = torch.utils.data.Subset(data.train_plain, order)
    return data


def small_image_transforms(mean: tuple, std: tuple) -> tuple[v2.Transform, v2.Transform]:
    """CIFAR's recipe on uint8 tensors: random 32-px crop of the 4-px padded image + flip; eval: normalise only."""
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = v2.Compose([v2.RandomCrop(SMALL_IMAGE_SIZE, padding=4), v2.RandomHorizontalFlip(), *normalise])
    return train, v2.Compose(normalise)


def _cifar_dir(root: Path) -> Path:
    return root if (root / "meta").exists() else root / "cifar-100-python"


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise UserError(f"cannot read CIFAR-100 file {path}: {error}") from None


def _cifar100(root: str) -> ClsData:
    folder = _cifar_dir(Path(root))
    names = [n.decode() for n in _unpickle(folder / "meta")[b"fine_label_names"]]
    train_tf, eval_tf = small_image_transforms(CIFAR_MEAN, CIFAR_STD)
    splits = []
    for split in ("train", "test"):
        raw = _unpickle(folder / split)
        images = torch.from_numpy(np.asarray(raw[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        splits.append((images, torch.tensor(raw[b"fine_labels"])))
    return _in_memory(splits[0], splits[1], names, CIFAR_MEAN, CIFAR_STD)


def _in_memory(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], names: list[str],
               mean: tuple, std: tuple) -> ClsData:
    """(images uint8 [N, 3, 32, 32], labels [N]) per split -> ClsData with CIFAR-style transforms."""
    train_tf, eval_tf = small_image_transforms(mean, std)
    return ClsData(TensorImages(*train, train_tf), TensorImages(*train, eval_tf), TensorImages(*val, eval_tf), names)


def _imagenet(root: str) -> ClsData:
    normalise = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), *normalise])
    eval_tf = v2.Compose([v2.Resize(256), v2.CenterCrop(224), *normalise])
    train = SafeImageFolder(str(Path(root) / "train"), transform=train_tf)
    val = SafeImageFolder(str(Path(root) / "val"), transform=eval_tf)
    if train.classes != val.classes:
        raise UserError(f"{root}: train/ and val/ have different class folders")
    return ClsData(train, SafeImageFolder(str(Path(root) / "train"), transform=eval_tf), val, train.classes)


def _resized(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> uint8 [N, 3, 32, 32], bilinear with antialiasing."""
    resized = F.interpolate(images.float(), size=(SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE), mode="bilinear",
                            antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _digits(root: str) -> ClsData:
    """scikit-learn's digits: a fixed, class-stratified 80/20 split (every 5th image of each class is validation)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _resized(torch.from_numpy(digits.images * (255.0 / 16.0)).unsqueeze(1))
    labels = torch.from_numpy(digits.target).long()
    rank_in_class = torch.zeros_like(labels)
    for label in labels.unique():
        members = labels == label
        rank_in_class[members] = torch.arange(int(members.sum()))
    is_val = rank_in_class % round(1 / DIGITS_VAL_SHARE) == 0
    return _in_memory((images[~is_val], labels[~is_val]), (images[is_val], labels[is_val]),
                      [str(d) for d in range(10)], (0.5,) * 3, (0.5,) * 3)


def _toyworld(root: str) -> ClsData:
    """toyworld's classification split: the images that show exactly one object, labelled by its kind. Broken
    shards and samples are skipped and counted (those of the training split in `skipped_at_load`)."""
    from clipkd_dino.toyworld.captions import KINDS

    splits, problems = [], {"train": Counter(), "val": Counter()}
    for split in ("train", "val"):
        images, labels = _single_object_images(Path(root) / split / "shards", KINDS, problems[split])
        splits.append((_resized(images), labels))
    if problems["val"]:
        print(f"warning: {Path(root) / 'val'}: {format_skipped(problems['val'])}", file=sys.stderr)
    data = _in_memory(splits[0], splits[1], list(KINDS), (0.5,) * 3, (0.5,) * 3)
    data.skipped_at_load = problems["train"]
    return data


def _single_object_images(shards: Path, kinds: tuple[str, ...],
                          problems: Counter) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-object images of the shards in `shards` with their kind's index; faults counted in `problems`
    (a sample without readable `.json` metadata as "bad_record"; captions are not needed)."""
    from clipkd_dino.data.samples import list_units, read_sample, unit_samples

    images, labels = [], []
    for unit in list_units(str(shards), "webdataset"):
        for ref in unit_samples(unit, problems):
            raw = read_sample(unit.path, ref)
            objects = (raw.metadata or {}).get("objects")
            if raw.image is None:
                problems["missing_image"] += 1
                continue
            try:
                image = load_image(raw.image)
            except BadSample as bad:
                problems[bad.reason] += 1
                continue
            if not isinstance(objects, list) or not all(isinstance(o, dict) and o.get("kind") in kinds
                                                        for o in objects):
                problems["bad_record"] += 1
            elif len(objects) == 1:
                images.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
                labels.append(kinds.index(objects[0]["kind"]))
    if not images:
        raise UserError(f"{shards}: no single-object toyworld images found")
    return torch.stack(images), torch.tensor(labels)
