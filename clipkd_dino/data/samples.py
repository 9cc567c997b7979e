"""Whole samples in a fixed order, for passes that visit every sample once (the labelling pass).

Training draws image-caption pairs at random (`pairs.py`); a pass over the data instead needs each sample once with
its key, its image and every caption. The data is cut into *units*, each processed and written as a whole (so a pass
resumes unit by unit and torchrun ranks split the units):

- webdataset: a unit is a shard. Its tar headers are indexed once (`tars.ShardMembers`: no image is decoded for
  that), then members are read by offset (`tars.read_member`), so a DataLoader can read a shard with several
  workers in order. The key is webdataset's `__key__`; captions are the non-empty lines of the `.txt` member; a
  `.json` member is kept as metadata. A key repeated within a shard is refused (a UserError naming the shard and
  both members).
- CSV: rows are grouped by image path (open_clip CSVs hold one row per caption); the key is the image path as
  written in the CSV; a unit is a block of `CSV_UNIT_SIZE` images in order of their first UTF-8 row. The file is
  read once into a `csv_table.CsvTable` (numpy arrays); a unit's SampleRefs are made from it when it is read.

A sample's identity is `SOURCE/KEY` (`identity.py`): the unit knows its source.

Faults are counted per reason, never raised (the reasons: docs/reliability.md): a shard that is empty
(`empty_file`), not a tar (`not_a_tar`) or truncated (`truncated_shard`, once per shard: the samples before the break
are kept); a CSV row that is not UTF-8 (`invalid_utf8`, one per row: its image keeps its other rows); a sample
without an image (`missing_image`), without a caption (`missing_caption`) or whose caption is not UTF-8
(`invalid_utf8`); an image that is empty (`empty_file`) or cannot be decoded (`bad_image`, see
`faults.load_image`).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from braceexpand import braceexpand

from clipkd_dino.data.csv_table import CsvTable
from clipkd_dino.data.faults import decode_captions
from clipkd_dino.data.identity import csv_source, sample_identity, shard_sources
from clipkd_dino.data.tars import ShardMembers, open_shard, read_member
from clipkd_dino.errors import ConfigError, UserError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
CSV_UNIT_SIZE = 10_000
IMAGE_REASONS = ("missing_image", "empty_file", "bad_image")


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's parts are: (offset, size) of each tar member by extension, or a CSV row group."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # webdataset: ext -> (offset, size)
    image_path: str = ""  # CSV: absolute image path
    captions: tuple[str, ...] = ()  # CSV: every caption of the image


@dataclass(frozen=True, eq=False)
class CsvBlock:
    """Images [start, stop) of a CSV file's table: image k's UTF-8 rows are rows[starts[k]:starts[k + 1]]
    (`CsvTable.image_rows`); its SampleRefs are made when asked for, so a unit holds no per-image object."""

    table: CsvTable
    rows: np.ndarray
    starts: np.ndarray
    start: int
    stop: int

    def samples(self, root: Path) -> tuple[SampleRef, ...]:
        """Each image's SampleRef: its path as written, joined to `root`, and its usable captions in file order."""
        refs = []
        for image in range(self.start, self.stop):
            rows = self.rows[self.starts[image]:self.starts[image + 1]]
            key = self.table.image_path(rows[0])
            captions = tuple(self.table.caption(row) for row in rows if self.table.usable(row))
            refs.append(SampleRef(key, image_path=str(root / key), captions=captions))
        return tuple(refs)


@dataclass(frozen=True)
class Unit:
    """A shard or a block of CSV images of source `source`; `name` (`SOURCE/SHARD` or `SOURCE/BLOCK`) is unique
    within the data and stable across runs and moves of the data folder.

    A shard's samples are indexed on demand (`unit_samples`), so a process only reads the headers of its own units.
    """

    name: str
    path: str
    source: str
    csv: CsvBlock | None = field(default=None, compare=False)
    csv_problems: Counter = field(default_factory=Counter, compare=False)  # rows dropped while reading the CSV

    def identity(self, key: str) -> str:
        """The identity of this unit's sample `key`."""
        return sample_identity(self.source, key)

    @property
    def file_stem(self) -> str:
        """`name` as a file name."""
        return self.name.replace("/", "~")


@dataclass
class RawSample:
    """A sample read from disk, not decoded: image bytes (or a file path), caption lines, optional metadata."""

    key: str
    image: bytes | str | None
    captions: list[str]
    metadata: dict | None
    problem: str | None = None  # a skip reason when the sample cannot be used


def expand_shards(pattern: str) -> list[str]:
    """Shard paths from brace patterns joined by '::' (open_clip convention); a folder stands for its *.tar files."""
    urls = []
    for part in pattern.split("::"):
        if Path(part).is_dir():
            urls.extend(sorted(str(p) for p in Path(part).glob("*.tar")))
        else:
            urls.extend(braceexpand(part))
    return urls


def data_format(path: str, configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    return "csv" if path.lower().endswith((".csv", ".tsv")) else "webdataset"


def check_sources(pattern: str, configured_format: str = "auto", key: str = "data.train") -> None:
    """One-line ConfigError naming `key` and the path when a CSV file or a shard does not exist."""
    paths = [pattern] if data_format(pattern, configured_format) == "csv" else expand_shards(pattern)
    if not paths:
        raise ConfigError(f"config key {key!r}: no shards in {pattern}")
    for path in paths:
        if "://" not in path and not Path(path).is_file():
            raise ConfigError(f"config key {key!r}: file not found: {path}")


def list_units(source: str, configured_format: str = "auto", csv_separator: str = "\t",
               csv_img_key: str = "filepath", csv_caption_key: str = "title") -> list[Unit]:
    """The units of `source` (CSV file or shards, with the syntax of `clipkd train`), in a fixed order."""
    if data_format(source, configured_format) == "csv":
        return _csv_units(source, csv_separator, csv_img_key, csv_caption_key)
    urls = expand_shards(source)
    if not urls:
        raise ConfigError(f"no shards in {source}")
    return [Unit(shard.name, shard.url, shard.source) for shard in shard_sources(urls)]


def unit_samples(unit: Unit, problems: Counter) -> tuple[SampleRef, ...]:
    """The samples of a unit in order; a broken or truncated shard, or undecodable CSV rows, count their problem."""
    if unit.csv is None:
        return index_shard(unit.path, problems)
    problems.update(unit.csv_problems)
    return unit.csv.samples(Path(unit.path).parent)


def read_sample(path: str, ref: SampleRef, handle: BinaryIO | None = None) -> RawSample:
    """The parts of one sample; `path` is its unit's shard (unused for CSV samples), read through `handle` when
    given (an open file of `path`, so that a shard read in order is opened once). A sample without an image
    member, or without a usable caption, gets its skip reason in `problem` (its image is not checked here)."""
    if not ref.members:
        return RawSample(ref.key, ref.image_path, list(ref.captions), None,
                         problem=None if ref.captions else "missing_caption")
    with contextlib.nullcontext(handle) if handle is not None else open_shard(path) as shard:
        parts = {ext: read_member(shard, offset, size) for ext, (offset, size) in ref.members.items()}
    image_ext = image_member(ref)
    if image_ext is None:
        return RawSample(ref.key, None, [], None, problem="missing_image")
    captions, problem = decode_captions(parts.get("txt"))
    metadata = None
    if "json" in parts:
        with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):  # metadata is optional
            metadata = json.loads(parts["json"])
    return RawSample(ref.key, parts[image_ext], captions, metadata, problem)


def image_member(ref: SampleRef) -> str | None:
    """The extension of a shard sample's image member, None when it has none."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in ref.members), None)


def index_shard(url: str, problems: Counter) -> tuple[SampleRef, ...]:
    """The complete samples of a shard in order, from its tar headers alone (no member data is read); a shard that
    is missing, empty, not a tar or truncated counts its problem once (the samples before a break are kept)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    shard = ShardMembers(url, problems)
    for member in shard:
        members = samples.setdefault(member.key, {})
        if member.ext in members:
            raise UserError(f"{url}: sample key {member.key!r} appears twice (members {member.name!r} at bytes "
                            f"{members[member.ext][0]} and {member.offset}): keys must be unique within a data "
                            "source")
        members[member.ext] = (member.offset, member.size)
    last = samples[next(reversed(samples))] if shard.truncated and samples else None
    if last is not None and not ("txt" in last and any(ext in last for ext in IMAGE_EXTENSIONS)):
        samples.popitem()  # the sample the break cut in two: part of the truncation, not a fault of its own
    return tuple(SampleRef(key, members) for key, members in samples.items())


def _csv_units(path: str, separator: str, img_key: str, caption_key: str) -> list[Unit]:
    table = CsvTable.read(path, separator, img_key, caption_key)
    rows, starts = table.image_rows()
    images, source = len(starts) - 1, csv_source(path)
    invalid = Counter(invalid_utf8=len(table) - len(rows))  # a row that is not UTF-8 is dropped on its own
    return [Unit(f"{source}/{start // CSV_UNIT_SIZE:06d}", path, source,
                 CsvBlock(table, rows, starts, start, min(start + CSV_UNIT_SIZE, images)),
                 +invalid if start == 0 else Counter())
            for start in range(0, max(images, 1), CSV_UNIT_SIZE)]
