"""Reading the labelling pass's output: `load_labels(DIR)`, the public reader users and other tools call.

Everything per sample is a flat binary array in row order, memory-mapped (nothing is parsed, no Python object per
sample), found through one identity -> row index (`clipkd_dino.data.identity.SampleIndex`):

    samples/index_ids.npy, index_rows.npy   sorted identity hashes and their rows (12 bytes a sample)
    samples/identities.txt                  one `SOURCE/KEY` per row (for people and `clipkd label stats`)
    samples/truth.txt                       ground-truth kinds per row (toyworld's metadata), when known
    samples/sources.json                    per source, its units (shards) and their sample counts
    labels/label.npy                        int32 [N] dense class (-1 = no label)
    labels/concept.npy                      int32 [N] nearest concept (index into `concepts_searched`)
    labels/score.npy, labels/margin.npy     float32 [N] cosine of the nearest concept, lead over the runner-up
    class_means.safetensors / .json         class means [C, D], counts, names, provenance (teacher, pool, views)
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from clipkd_dino.data.identity import SampleIndex, identity_hashes
from clipkd_dino.errors import UserError
from clipkd_dino.teacher.class_means import SIDECAR_FILE, ClassMeans, load_class_means

SAMPLES_DIR = "samples"
LABELS_DIR = "labels"
IDENTITIES_FILE = "identities.txt"
TRUTH_FILE = "truth.txt"
SOURCES_FILE = "sources.json"
LABEL_ARRAYS = ("label", "concept", "score", "margin")
LABELS_FILE = f"{LABELS_DIR}/label.npy"  # present once the labels of a pass are complete


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="surrogateescape").split("\n")[:-1] if path.is_file() else []


def read_sources(directory: Path) -> dict[str, dict[str, int]]:
    """source -> {unit name: samples} of a labelling output."""
    return json.loads((Path(directory) / SAMPLES_DIR / SOURCES_FILE).read_text())


class Labels:
    """Pseudo-labels of a data set and the class means they define (see the module doc for the files).

    `label_rows(hashes)` is the hot-path lookup (numpy, vectorised); the per-sample lists (`keys`, `nearest`,
    `truth`) are read on first use, for reports. concepts [C] class names; class_means, text_class_means [C, D]
    float32 unnormalised; counts [C]; provenance: everything that produced them.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not (self.directory / LABELS_FILE).is_file():
            raise UserError(f"labels not found: {self.directory / LABELS_FILE} "
                            f"(run `clipkd label ... --out {self.directory}`)")

    def __getstate__(self) -> dict:
        return {"directory": self.directory}  # DataLoader workers reopen the memory maps, they do not copy them

    @cached_property
    def index(self) -> SampleIndex:
        return SampleIndex.load(self.directory / SAMPLES_DIR)

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.load(self.directory / LABELS_DIR / f"{name}.npy", mmap_mode="r") for name in LABEL_ARRAYS}

    @cached_property
    def means(self) -> ClassMeans:
        return load_class_means(self.directory)

    @cached_property
    def provenance(self) -> dict:
        """Everything that produced the labels (teacher, its digest, pool, views, settings)."""
        return json.loads((self.directory / SIDECAR_FILE).read_text())

    @property
    def concepts(self) -> list[str]:
        return self.means.names

    @property
    def counts(self) -> torch.Tensor:
        return self.means.counts

    @property
    def class_means(self) -> torch.Tensor:
        return self.means.image

    @property
    def text_class_means(self) -> torch.Tensor | None:
        return self.means.text

    def __len__(self) -> int:
        return len(self.index)

    def label_rows(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 [B], found bool [B]) of identity hashes; -1 where a hash is not in the labels."""
        rows = self.index.lookup(hashes)
        found = rows >= 0
        labels = np.full(len(rows), -1, dtype=np.int64)
        labels[found] = self.arrays["label"][rows[found]]
        return labels, found

    def label_of(self, identities: list[str]) -> torch.Tensor:
        """The labels [B] of sample identities (-1 for one that was not labelled, e.g. skipped as unreadable)."""
        return torch.from_numpy(self.label_rows(identity_hashes(identities))[0])

    def __contains__(self, identity: str) -> bool:
        return bool(self.label_rows(identity_hashes([identity]))[1][0])

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays["label"], dtype=np.int64))

    @property
    def scores(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays["score"]))

    @property
    def margins(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays["margin"]))

    @cached_property
    def keys(self) -> list[str]:
        """The identity (`SOURCE/KEY`) of every row."""
        return read_lines(self.directory / SAMPLES_DIR / IDENTITIES_FILE)

    @cached_property
    def nearest(self) -> list[str]:
        """The nearest concept's name of every row (even where the label is -1)."""
        names = self.provenance["concepts_searched"]
        return [names[i] for i in self.arrays["concept"].tolist()]

    @cached_property
    def truth(self) -> list[str]:
        """Ground-truth kinds per row, comma-joined ('' where unknown)."""
        return read_lines(self.directory / SAMPLES_DIR / TRUTH_FILE) or [""] * len(self)


def load_labels(directory: str | Path) -> Labels:
    """Read `clipkd label`'s output folder."""
    return Labels(directory)
