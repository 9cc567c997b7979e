"""The teacher-embedding cache: the teacher's unnormalised embeddings of K image views and every caption per sample.

Layout of `DIR/cache/` (rows are the rows of the labels, found through `DIR/samples/`'s identity index):

    manifest.json            teacher, its weights' digest, the pass's digest, view spec (crop ranges, flip, seed),
                             K, dtype, dim, sample and caption counts
    images.npy               [N, K, D] image embeddings of views 0..K-1
    texts.npy                [M, D] caption embeddings; the captions of row i are rows offsets[i]:offsets[i + 1]
    caption_offsets.npy      int64 [N + 1], in the order of the sample's caption lines

fp16 is stored as float16; bf16, which numpy lacks, as its raw uint16 bits. Three memory maps per process whatever
the number of shards; a training run touches only the rows it draws. Readers pickle as their folder (DataLoader
workers reopen the maps instead of copying arrays).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from clipkd_dino.data.identity import SampleIndex, identity_hashes
from clipkd_dino.errors import UserError

CACHE_DIR = "cache"
MANIFEST = "manifest.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
NUMPY_DTYPES = {"fp16": np.float16, "bf16": np.uint16}


def to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """float tensor -> numpy array in the cache dtype (bf16 as uint16 bits)."""
    tensor = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    return tensor.view(torch.uint16).numpy() if dtype == "bf16" else tensor.numpy()


def from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Cache rows (a copy: the memory map is read-only) -> float32 tensor."""
    tensor = torch.from_numpy(np.array(array))
    return (tensor.view(torch.bfloat16) if dtype == "bf16" else tensor).float()


def cache_folder(directory: str | Path) -> Path:
    """`DIR/cache` for a labelling output folder, or DIR itself when it is the cache folder."""
    directory = Path(directory)
    return directory / CACHE_DIR if (directory / CACHE_DIR / MANIFEST).is_file() else directory


class TeacherCache:
    """Read a cache by sample identity: `lookup(hashes, views, caption_index)` for batches, `image`/`texts` for
    single samples."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = cache_folder(directory)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"teacher cache not found: {manifest_path} (run `clipkd label --cache-views K`)")
        self.manifest = json.loads(manifest_path.read_text())
        self.dtype, self.views = self.manifest["dtype"], int(self.manifest["views"])

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "manifest": self.manifest, "dtype": self.dtype, "views": self.views}

    @cached_property
    def arrays(self) -> tuple[SampleIndex, np.ndarray, np.ndarray, np.ndarray]:
        """(index, images, texts, caption offsets), opened on first use in each process."""
        from clipkd_dino.teacher.labels import SAMPLES_DIR

        index = SampleIndex.load(self.dir.parent / SAMPLES_DIR)
        images, texts, offsets = (np.load(self.dir / f"{name}.npy", mmap_mode="r")
                                  for name in ("images", "texts", "caption_offsets"))
        return index, images, texts, offsets

    def __len__(self) -> int:
        return len(self.arrays[0])

    def _rows(self, hashes: np.ndarray, caption_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, caption rows, found) of identity hashes [B] and the caption drawn [B]."""
        index, _, _, offsets = self.arrays
        rows = index.lookup(hashes)
        found = rows >= 0
        text_rows = np.zeros(len(rows), dtype=np.int64)
        text_rows[found] = offsets[rows[found]] + np.asarray(caption_index)[found]
        found[found] &= text_rows[found] < offsets[rows[found] + 1]
        return rows, text_rows, found

    def covered(self, hashes: np.ndarray, caption_index: np.ndarray) -> np.ndarray:
        """bool [B]: the sample and the caption drawn are in the cache."""
        return self._rows(hashes, caption_index)[2]

    def lookup(self, hashes: np.ndarray, views: np.ndarray,
               caption_index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [B, D], text [B, D]) float32 for identity hashes [B], the view [B] and the caption [B] drawn;
        a KeyError when one is not cached (see `covered`)."""
        rows, text_rows, found = self._rows(hashes, caption_index)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} samples are not in the teacher cache {self.dir}")
        _, images, texts, _ = self.arrays
        return from_numpy(images[rows, np.asarray(views)], self.dtype), from_numpy(texts[text_rows], self.dtype)

    def _row(self, identity: str) -> int:
        row = int(self.arrays[0].lookup(identity_hashes([identity]))[0])
        if row < 0:
            raise KeyError(f"sample {identity!r} is not in the teacher cache {self.dir}")
        return row

    def __contains__(self, identity: str) -> bool:
        return int(self.arrays[0].lookup(identity_hashes([identity]))[0]) >= 0

    def image(self, identity: str, view: int) -> torch.Tensor:
        """The teacher's embedding of view `view` (0 <= view < K) of a sample: [D] float32."""
        return from_numpy(self.arrays[1][self._row(identity), view], self.dtype)

    def texts(self, identity: str) -> torch.Tensor:
        """The teacher's embeddings of every caption of a sample, in caption order: [captions, D] float32."""
        row, offsets = self._row(identity), self.arrays[3]
        return from_numpy(self.arrays[2][offsets[row]:offsets[row + 1]], self.dtype)
