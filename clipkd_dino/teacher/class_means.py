"""Class means of unnormalised teacher embeddings: running float64 sums, the `--min-images` cut, files.

Memory is [C, D] whatever the number of images: `ClassSums.add` folds each batch into per-class sums and counts.
`SparseSums` holds only the classes seen so far ([k, D], k <= min(C, images)): what one data unit keeps and writes.
Files: `class_means.safetensors` (image [C, D], text [C, D] float32, counts [C], text_counts [C] int64) with a JSON
sidecar (concept names and everything that produced them). `load_class_means` also reads the reference KD++ centre
file (JSON: class index -> list of floats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from clipkd_dino.errors import UserError

MEANS_FILE = "class_means.safetensors"
SIDECAR_FILE = "class_means.json"


class ClassSums:
    """Per-class float64 sums and counts of embeddings, for `num_classes` classes of dimension `dim`."""

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """embeddings [N, D], labels [N] (-1 = ignored)."""
        valid = labels >= 0
        labels = labels[valid].to(self.sums.device)
        self.sums.index_add_(0, labels, embeddings[valid].to(self.sums.device, torch.float64))
        self.counts += torch.bincount(labels, minlength=len(self.counts))

    def merge(self, other: ClassSums) -> None:
        self.sums += other.sums.to(self.sums.device)
        self.counts += other.counts.to(self.counts.device)

    def add_sparse(self, classes: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Add the rows of a `SparseSums` (classes [k], sums [k, D], counts [k])."""
        classes = classes.to(self.sums.device)
        self.sums.index_add_(0, classes, sums.to(self.sums.device, torch.float64))
        self.counts.index_add_(0, classes, counts.to(self.counts.device))

    def means(self) -> torch.Tensor:
        """[C, D] float32; a class without samples has a zero mean."""
        return (self.sums / self.counts.clamp(min=1)[:, None]).float()


class SparseSums:
    """Float64 sums and counts of embeddings of dimension `dim` for the classes seen so far only: classes [k]
    (sorted), sums [k, D], counts [k]."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.classes = torch.zeros(0, dtype=torch.int64, device=device)
        self.sums = torch.zeros(0, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """embeddings [N, D], labels [N] (-1 = ignored)."""
        valid = labels >= 0
        if not valid.any():
            return
        labels = labels[valid].to(self.classes.device)
        classes, inverse = torch.unique(torch.cat([self.classes, labels]), return_inverse=True)
        old, new = inverse[:len(self.classes)], inverse[len(self.classes):]
        sums = torch.zeros(len(classes), self.sums.shape[1], dtype=torch.float64, device=self.sums.device)
        sums.index_add_(0, old, self.sums).index_add_(0, new, embeddings[valid].to(sums.device, torch.float64))
        counts = torch.zeros(len(classes), dtype=torch.int64, device=self.counts.device)
        counts.index_add_(0, old, self.counts).index_add_(0, new, torch.ones_like(new))
        self.classes, self.sums, self.counts = classes, sums, counts

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """CPU tensors named `{prefix}_classes`, `{prefix}_sums`, `{prefix}_counts`."""
        return {f"{prefix}_{name}": getattr(self, name).cpu().contiguous() for name in ("classes", "sums", "counts")}


def dense_classes(counts: torch.Tensor, min_images: int) -> torch.Tensor:
    """The kept concept indices (count >= max(min_images, 1)), in concept order: class c is concept kept[c]."""
    return torch.nonzero(counts >= max(min_images, 1)).flatten()


def renumber(concepts: torch.Tensor, kept: torch.Tensor, num_concepts: int) -> torch.Tensor:
    """Concept indices [N] (-1 allowed) -> dense class indices, -1 for concepts not in `kept`."""
    table = torch.full((num_concepts + 1,), -1, dtype=torch.long)  # the last slot maps -1 to -1
    table[kept] = torch.arange(len(kept))
    return table[torch.where(concepts < 0, num_concepts, concepts)]


@dataclass
class ClassMeans:
    """image [C, D] (and text [C, D] when known) float32 means, unnormalised; counts [C]; names [C]."""

    image: torch.Tensor
    counts: torch.Tensor
    names: list[str]
    text: torch.Tensor | None = None
    text_counts: torch.Tensor | None = None


def save_class_means(directory: Path, means: ClassMeans, sidecar: dict) -> None:
    from safetensors.torch import save

    from clipkd_dino.files import write_atomic, write_json_atomic

    tensors = {"image": means.image.contiguous(), "counts": means.counts}
    if means.text is not None:
        tensors |= {"text": means.text.contiguous(), "text_counts": means.text_counts}
    blob = save(tensors)
    write_atomic(directory / MEANS_FILE, lambda stream: stream.write(blob))
    write_json_atomic(directory / SIDECAR_FILE, {"concepts": means.names, "counts": means.counts.tolist(), **sidecar})


def load_class_means(path: str | Path) -> ClassMeans:
    """Our labelling output (its folder or the .safetensors file) or a KD++ centre JSON (index -> floats)."""
    path = Path(path)
    if path.is_dir():
        path = path / MEANS_FILE
    if not path.is_file():
        raise UserError(f"class means not found: {path}")
    if path.suffix == ".json":
        return _load_kdpp_centres(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        names = json.loads((path.parent / SIDECAR_FILE).read_text())["concepts"]
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as error:
        raise UserError(f"cannot read class means {path}: {error}") from None
    return ClassMeans(tensors["image"], tensors["counts"], names, tensors.get("text"), tensors.get("text_counts"))


def _load_kdpp_centres(path: Path) -> ClassMeans:
    try:
        raw = json.loads(path.read_text())
        rows = sorted((int(index), [float(x) for x in values]) for index, values in raw.items())
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a KD++ centre file (JSON: class index -> list of floats): {error}") from None
    if [index for index, _ in rows] != list(range(len(rows))) or len({len(v) for _, v in rows}) != 1:
        raise UserError(f"{path}: class indices must be 0..C-1 and every centre the same length")
    image = torch.tensor([values for _, values in rows], dtype=torch.float32)
    return ClassMeans(image, torch.zeros(len(rows), dtype=torch.int64), [str(i) for i, _ in rows])
