"""Sample identity across data sources: `SOURCE/KEY`, and its 64-bit hash that readers look rows up by.

img2dataset names samples by shard number and offset, so CC3M's and CC12M's shards hold the same key strings; a join
by bare key would give one sample another's teacher embedding and label. So every sample is named by its source and
its own key (kept visible): `cc3m/000000123`, `cc12m/000000123`.

A *source* is a folder of shards (however they are named: folder, brace pattern, one part of a `::` join) or a CSV
file. Its name is the shortest tail of its folder path (the CSV file's stem for CSV) that no other source of the same
data shares, at least one component: `/data/cc3m/{...}.tar::/data/cc12m/{...}.tar` -> `cc3m`, `cc12m`. The absolute
location is not part of the name, so moving the data keeps identities (and labels) valid. Within a source, keys are
unique: the labelling pass refuses a repeated key, naming both places.

Lookups go by `identity_hashes` (the first 8 bytes of BLAKE2b of the identity, as int64): a sorted array of them is
the whole key -> row index, 8 bytes a sample plus the row numbers. A collision between two different identities is
detected when the index is built (probability about N^2 / 2^65, 5e-6 at 13M samples).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class Shard:
    """A shard file and the name of the source it belongs to."""

    url: str
    source: str

    @property
    def name(self) -> str:
        """`SOURCE/STEM` (the file name without `.tar`): the shard's name, stable when the data folder moves."""
        return f"{self.source}/{os.path.splitext(os.path.basename(self.url))[0]}"


def sample_identity(source: str, key: str) -> str:
    return f"{source}/{key}"


def source_names(locations: Iterable[str]) -> dict[str, str]:
    """location -> name: the shortest tail of each location's path components that no other location ends with."""
    locations = list(dict.fromkeys(locations))
    split = {location: _components(location) for location in locations}
    names = {}
    for location, parts in split.items():
        others = [p for other, p in split.items() if other != location]
        for length in range(1, len(parts) + 1):
            tail = parts[-length:]
            if all(other[-length:] != tail for other in others):
                break
        names[location] = "/".join(tail).lstrip("/") or location
    return names


def _components(location: str) -> tuple[str, ...]:
    if "://" not in location and not location.startswith("pipe:"):
        location = os.path.abspath(location)
    return tuple(part for part in location.replace("\\", "/").split("/") if part)


def shard_sources(urls: list[str]) -> list[Shard]:
    """The shards of `urls`, each with its source: the shard's folder, named by `source_names`."""
    names = source_names(os.path.dirname(url) or "." for url in urls)
    return [Shard(url, names[os.path.dirname(url) or "."]) for url in urls]


def csv_source(path: str) -> str:
    """The source name of a CSV file: its stem."""
    return os.path.splitext(os.path.basename(path))[0]


def identity_hashes(identities: Iterable[str]) -> np.ndarray:
    """int64 [N]: the first 8 bytes of BLAKE2b of each identity (UTF-8; undecodable bytes as surrogate escapes)."""
    digests = b"".join(hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=8).digest()
                       for identity in identities)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


class SampleIndex:
    """identity hash -> row: `ids` sorted int64 [N] and `rows` [N] (int32 below 2^31 rows), memory-mapped when read
    from a folder (`index_ids.npy`, `index_rows.npy`), so every process and loader worker shares the same pages."""

    FILES = ("index_ids.npy", "index_rows.npy")

    def __init__(self, ids: np.ndarray, rows: np.ndarray) -> None:
        self.ids, self.rows = ids, rows

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, hashes: np.ndarray) -> tuple[SampleIndex, list[tuple[int, int]]]:
        """The index of `hashes` (int64 [N], in row order) and the row pairs whose hashes are equal."""
        order = np.argsort(hashes, kind="stable")
        ids = hashes[order]
        equal = np.flatnonzero(ids[1:] == ids[:-1])
        duplicates = [(int(order[i]), int(order[i + 1])) for i in equal[:10]]
        rows = order.astype(np.int32 if len(order) < 2**31 else np.int64)
        return cls(ids, rows), duplicates

    def save(self, folder) -> None:
        from clipkd_dino.files import write_atomic

        for name, array in zip(self.FILES, (self.ids, self.rows)):
            write_atomic(os.path.join(folder, name), lambda stream, a=array: np.save(stream, a))

    @classmethod
    def load(cls, folder) -> SampleIndex:
        ids, rows = (np.load(os.path.join(folder, name), mmap_mode="r") for name in cls.FILES)
        return cls(ids, rows)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """int64 [B]: the row of each hash, -1 where it is not in the index."""
        hashes = np.asarray(hashes, dtype=np.int64)
        if not len(self.ids):
            return np.full(len(hashes), -1, dtype=np.int64)
        where = np.minimum(np.searchsorted(self.ids, hashes), len(self.ids) - 1)
        found = self.ids[where] == hashes
        return np.where(found, self.rows[where].astype(np.int64), -1)
