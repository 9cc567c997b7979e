"""Reading the labelling pass's output: `load_labels(DIR)`, the public reader users and other tools call."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipkd_dino.errors import UserError
from clipkd_dino.teacher.class_means import load_class_means

LABELS_FILE = "labels.tsv"


@dataclass
class Labels:
    """Pseudo-labels of a data set and the class means they define.

    keys [N] sample keys (webdataset `__key__`, or the CSV row's image path); labels [N] int64 (-1 = none);
    scores, margins [N] float32 (cosine of the nearest concept, and its lead over the runner-up); nearest [N] the
    nearest concept's name (even where the label is -1); truth [N] ground-truth kinds (comma-joined, '' if unknown);
    concepts [C] class names (index = class); class_means, text_class_means [C, D] float32 unnormalised; counts [C].
    """

    keys: list[str]
    labels: torch.Tensor
    scores: torch.Tensor
    margins: torch.Tensor
    nearest: list[str]
    truth: list[str]
    concepts: list[str]
    class_means: torch.Tensor
    text_class_means: torch.Tensor | None
    counts: torch.Tensor
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._rows()

    def _rows(self) -> dict[str, int]:
        if not self._index:
            self._index = {key: row for row, key in enumerate(self.keys)}
        return self._index

    def label_of(self, keys: list[str]) -> torch.Tensor:
        """The labels of `keys` [B] (-1 for a key that was not labelled, e.g. a sample skipped as unreadable)."""
        index = self._rows()
        rows = torch.tensor([index.get(key, -1) for key in keys], dtype=torch.long)
        padded = torch.cat([self.labels, torch.tensor([-1])])
        return padded[rows]  # row -1 reads the padding


def load_labels(directory: str | Path) -> Labels:
    """Read `clipkd label`'s output folder."""
    directory = Path(directory)
    path = directory / LABELS_FILE
    if not path.is_file():
        raise UserError(f"labels not found: {path} (run `clipkd label ... --out {directory}`)")
    keys, labels, scores, margins, nearest, truth = [], [], [], [], [], []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            keys.append(row["key"])
            labels.append(int(row["label"]))
            scores.append(float(row["score"]))
            margins.append(float(row["margin"]))
            nearest.append(row["concept"])
            truth.append(row.get("truth") or "")
    means = load_class_means(directory)
    return Labels(keys, torch.tensor(labels, dtype=torch.long), torch.tensor(scores), torch.tensor(margins), nearest,
                  truth, means.names, means.image, means.text, means.counts)
