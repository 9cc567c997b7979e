"""Whole samples in a fixed order, for passes that visit every sample once (the labelling pass).

Training draws image-caption pairs at random (`pairs.py`); a pass over the data instead needs each sample once with
its key, its image and every caption. The data is cut into *units*, each processed and written as a whole (so a pass
resumes unit by unit and torchrun ranks split the units):

- webdataset: a unit is a shard. Its tar headers are indexed once (no image is decoded for that), then members are
  read by offset, so a DataLoader can read a shard with several workers in order. The key is webdataset's
  `__key__`; captions are the non-empty lines of the `.txt` member; a `.json` member is kept as metadata.
- CSV: rows are grouped by image path (open_clip CSVs hold one row per caption); the key is the image path as
  written in the CSV; a unit is a block of `CSV_UNIT_SIZE` images in file order.

Unreadable shards, truncated shards and samples without an image are counted per reason, never raised.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clipkd_dino.data.pairs import IMAGE_EXTENSIONS, data_format, expand_shards
from clipkd_dino.errors import ConfigError

CSV_UNIT_SIZE = 10_000


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's parts are: (offset, size) of each tar member by extension, or a CSV row group."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # webdataset: ext -> (offset, size)
    image_path: str = ""  # CSV: absolute image path
    captions: tuple[str, ...] = ()  # CSV: every caption of the image


@dataclass(frozen=True)
class Unit:
    """A shard or a block of CSV images; `name` is unique within a data source and stable across runs.

    A shard's samples are indexed on demand (`unit_samples`), so a process only reads the headers of its own units.
    """

    name: str
    path: str
    csv_samples: tuple[SampleRef, ...] | None = None


@dataclass
class RawSample:
    """A sample read from disk, not decoded: image bytes (or a file path), caption lines, optional metadata."""

    key: str
    image: bytes | str | None
    captions: list[str]
    metadata: dict | None
    problem: str | None = None  # a skip reason when the sample cannot be used


def list_units(source: str, configured_format: str = "auto", csv_separator: str = "\t",
               csv_img_key: str = "filepath", csv_caption_key: str = "title") -> list[Unit]:
    """The units of `source` (CSV file or shards, with the syntax of `clipkd train`), in a fixed order."""
    if data_format(source, configured_format) == "csv":
        return _csv_units(source, csv_separator, csv_img_key, csv_caption_key)
    urls = expand_shards(source)
    if not urls:
        raise ConfigError(f"no shards in {source}")
    return [Unit(f"{position:05d}-{Path(url).stem}", url) for position, url in enumerate(urls)]


def unit_samples(unit: Unit, problems: Counter) -> tuple[SampleRef, ...]:
    """The samples of a unit in order; a broken or truncated shard counts its problem and yields what it can."""
    return unit.csv_samples if unit.csv_samples is not None else _index_shard(unit.path, problems)


def read_sample(path: str, ref: SampleRef) -> RawSample:
    """The parts of one sample; `path` is its unit's shard (unused for CSV samples)."""
    if not ref.members:
        return RawSample(ref.key, ref.image_path, list(ref.captions), None)
    parts = {}
    with open(path, "rb") as handle:
        for ext, (offset, size) in ref.members.items():
            handle.seek(offset)
            parts[ext] = handle.read(size)
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if image_ext is None:
        return RawSample(ref.key, None, [], None, problem="missing_member")
    sample = RawSample(ref.key, parts[image_ext], [], None)
    if "txt" in parts:
        try:
            sample.captions = [line for line in parts["txt"].decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            sample.problem = "bad_caption"
    if "json" in parts:
        try:
            sample.metadata = json.loads(parts["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            sample.metadata = None
    return sample


def _index_shard(url: str, problems: Counter) -> tuple[SampleRef, ...]:
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(url, mode="r:") as archive:
            while True:
                try:
                    member = archive.next()
                except (tarfile.TarError, EOFError, OSError):
                    problems["truncated_shard"] += 1
                    break
                if member is None:
                    break
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError):
        problems["bad_shard"] += 1
    try:
        end = Path(url).stat().st_size  # a truncated last member lies past the end of the file: drop it
    except OSError:
        problems["bad_shard"] += 1
        return ()
    complete = {key: members for key, members in samples.items()
                if all(offset + size <= end for offset, size in members.values())}
    if len(complete) < len(samples) and not problems["truncated_shard"]:
        problems["truncated_shard"] += 1
    return tuple(SampleRef(key, members) for key, members in complete.items())


def _csv_units(path: str, separator: str, img_key: str, caption_key: str) -> list[Unit]:
    captions: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: column {missing[0]!r} not found (columns: {reader.fieldnames})")
        for row in reader:
            lines = captions.setdefault(row[img_key] or "", [])
            if (row[caption_key] or "").strip():
                lines.append(row[caption_key])
    root = Path(path).parent
    refs = [SampleRef(key, image_path=str(root / key), captions=tuple(lines)) for key, lines in captions.items()]
    stem = Path(path).stem
    return [Unit(f"{stem}-{start // CSV_UNIT_SIZE:06d}", path, tuple(refs[start:start + CSV_UNIT_SIZE]))
            for start in range(0, len(refs), CSV_UNIT_SIZE)]
