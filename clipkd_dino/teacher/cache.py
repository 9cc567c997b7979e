"""The teacher-embedding cache: the teacher's unnormalised embeddings of K image views and every caption per sample.

Layout of `DIR/cache/` (one set of files per data unit, written atomically when the unit is done):

    manifest.json            teacher, checkpoint digest, view spec (size, crop ranges, flip, normalisation, seed),
                             K, dtype, dim and the units in order
    UNIT.keys.json           the unit's sample keys and caption offsets (captions of sample i: rows
                             offsets[i]:offsets[i+1] of UNIT.texts.npy, in the order of the sample's caption lines)
    UNIT.images.npy          [n, K, D] image embeddings of views 0..K-1
    UNIT.texts.npy           [captions, D] caption embeddings

fp16 is stored as float16; bf16, which numpy lacks, as its raw uint16 bits. Arrays are memory-mapped on reading:
a training run touches only the rows it draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from clipkd_dino.errors import UserError
from clipkd_dino.files import write_atomic, write_json_atomic

CACHE_DIR = "cache"
MANIFEST = "manifest.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """float tensor -> numpy array in the cache dtype (bf16 as uint16 bits)."""
    tensor = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    return tensor.view(torch.uint16).numpy() if dtype == "bf16" else tensor.numpy()


def _from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))  # a copy: the memory map is read-only
    return (tensor.view(torch.bfloat16) if dtype == "bf16" else tensor).float()


def write_unit(cache_dir: Path, unit: str, keys: list[str], images: np.ndarray, texts: np.ndarray,
               offsets: list[int]) -> None:
    """Write one unit's arrays and keys; the keys file goes last, so a unit is complete once it exists."""
    for suffix, array in (("images", images), ("texts", texts)):
        write_atomic(cache_dir / f"{unit}.{suffix}.npy", lambda stream, a=array: np.save(stream, a))
    write_json_atomic(cache_dir / f"{unit}.keys.json", {"keys": keys, "caption_offsets": offsets}, indent=None)


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    write_json_atomic(cache_dir / MANIFEST, manifest)


class TeacherCache:
    """Read a cache: `image(key, view)` [D], `texts(key)` [captions, D], float32 tensors, by sample key."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.dir = directory / CACHE_DIR if (directory / CACHE_DIR / MANIFEST).is_file() else directory
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"teacher cache not found: {manifest_path} (run `clipkd label --cache-views K`)")
        self.manifest = json.loads(manifest_path.read_text())
        self.dtype, self.views = self.manifest["dtype"], self.manifest["views"]
        self._images, self._texts, self._offsets = [], [], []
        self._where: dict[str, tuple[int, int]] = {}
        for number, unit in enumerate(self.manifest["units"]):
            keys = json.loads((self.dir / f"{unit}.keys.json").read_text())
            self._images.append(np.load(self.dir / f"{unit}.images.npy", mmap_mode="r"))
            self._texts.append(np.load(self.dir / f"{unit}.texts.npy", mmap_mode="r"))
            self._offsets.append(keys["caption_offsets"])
            self._where.update((key, (number, row)) for row, key in enumerate(keys["keys"]))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def _locate(self, key: str) -> tuple[int, int]:
        try:
            return self._where[key]
        except KeyError:
            raise KeyError(f"sample {key!r} is not in the teacher cache {self.dir}") from None

    def image(self, key: str, view: int) -> torch.Tensor:
        """The teacher's embedding of view `view` (0 <= view < K) of sample `key`: [D] float32."""
        unit, row = self._locate(key)
        return _from_numpy(self._images[unit][row, view], self.dtype)

    def texts(self, key: str) -> torch.Tensor:
        """The teacher's embeddings of every caption of sample `key`, in caption order: [captions, D] float32."""
        unit, row = self._locate(key)
        offsets = self._offsets[unit]
        return _from_numpy(self._texts[unit][offsets[row]:offsets[row + 1]], self.dtype)
