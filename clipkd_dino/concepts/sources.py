"""Caption sources: plain text, CSV/TSV, COCO captions JSON, JSONL and webdataset shards, read as streams.

Paths are expanded as `clipkd train` expands them. A shard's `.txt` member holds one caption a line (as the training
reader reads it: toyworld writes five captions per image).

Every reader yields raw caption strings and counts the records it cannot use in a shared `problems` counter: a
caption that is not UTF-8 (`invalid_utf8`, by the policy of every reader, `faults.decode_text`: a line, a CSV row's
caption, a JSONL record's or COCO annotation's caption, a shard sample's whole `.txt` member, as training reads it),
a malformed record (`bad_record`), a blank record (`empty`), a shard that is empty (`empty_file`), not a tar
(`not_a_tar`) or ends early (`truncated_shard`: the captions before the break are kept), a shard sample without a
`.txt` member (`missing_caption`). Shards are read by `data.tars.ShardMembers`, the tar reader of every command.
Each file is hashed while it is read, so a source's digest costs no second pass.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipkd_dino.data.faults import decode_text
from clipkd_dino.data.tars import ShardMembers
from clipkd_dino.errors import UserError

FORMATS = {
    ".txt": "text", ".csv": "csv", ".tsv": "csv", ".json": "coco", ".jsonl": "jsonl",
    ".tar": "webdataset", ".tar.gz": "webdataset", ".tgz": "webdataset",
}


@dataclass(frozen=True)
class ReaderOptions:
    """Format options, named after open_clip's flags where it has them."""

    csv_separator: str = "\t"
    csv_caption_key: str = "title"
    jsonl_caption_key: str = "caption"


@dataclass
class Source:
    """One caption file; `sha256` and `captions` are filled once it has been read to the end."""

    path: Path
    format: str
    sha256: str = ""
    captions: int = 0

    def describe(self) -> dict[str, object]:
        return {"path": str(self.path), "format": self.format, "sha256": self.sha256, "captions": self.captions}


def expand_sources(patterns: Sequence[str]) -> list[Source]:
    """Expand each pattern as `clipkd train` does (brace patterns, sets joined by '::', a folder for its *.tar
    shards; `clipkd_dino.data.pairs.expand_shards`) and check that each file exists and has a known format."""
    from clipkd_dino.data.samples import expand_shards

    sources = []
    for pattern in patterns:
        names = expand_shards(pattern)
        if not names:
            raise UserError(f"no *.tar shards in {pattern}")
        for name in names:
            path = Path(name)
            if not path.is_file():
                raise UserError(f"caption source not found: {path}")
            sources.append(Source(path, source_format(path)))
    return sources


def source_format(path: Path) -> str:
    """The reader for a file, from its extension."""
    name = path.name.lower()
    for suffix, kind in sorted(FORMATS.items(), key=lambda item: -len(item[0])):
        if name.endswith(suffix):
            return kind
    known = ", ".join(sorted(FORMATS))
    raise UserError(f"unknown caption source format: {path} (expected one of {known})")


def read_captions(source: Source, options: ReaderOptions, problems: Counter[str]) -> Iterator[str]:
    """Yield the raw captions of one source; fills `source.sha256` and `source.captions` when done."""
    reader = {"text": _text, "csv": _csv, "coco": _coco, "jsonl": _jsonl, "webdataset": _webdataset}[source.format]
    try:
        raw = open(source.path, "rb")
    except OSError as error:
        raise UserError(f"cannot open caption source {source.path}: {error}") from error
    with raw:
        hashing = _HashingReader(raw)
        for caption in reader(io.BufferedReader(hashing, buffer_size=1 << 20), source, options, problems):
            source.captions += 1
            yield caption
        source.sha256 = hashing.finish()


class _HashingReader(io.RawIOBase):
    """A raw binary stream that feeds every byte it reads into a sha256."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self._raw, self._hash = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        size = self._raw.readinto(buffer)
        self._hash.update(memoryview(buffer)[:size])
        return size

    def finish(self) -> str:
        """Hash what is left unread (e.g. a tar's trailing blocks) and return the file's digest."""
        while chunk := self._raw.read(1 << 20):
            self._hash.update(chunk)
        return self._hash.hexdigest()


def _decoded(raw: bytes | str, problems: Counter[str]) -> Iterator[str]:
    """The caption `raw` decoded (`decode_text`), or nothing and an `invalid_utf8` count."""
    text = decode_text(raw)
    if text is None:
        problems["invalid_utf8"] += 1
    else:
        yield text


def _text(stream: io.BufferedReader, source: Source, options: ReaderOptions, problems: Counter[str]) -> Iterator[str]:
    for line in stream:
        yield from _decoded(line.rstrip(b"\r\n"), problems)


def _csv(stream: io.BufferedReader, source: Source, options: ReaderOptions, problems: Counter[str]) -> Iterator[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
    rows = csv.reader(text, delimiter=options.csv_separator)
    header = next(rows, None)
    key = options.csv_caption_key
    if header is None or key not in header:
        found = ", ".join(repr(name) for name in header or [])
        raise UserError(f"{source.path}: no caption column {key!r} (columns: {found}); set --csv-caption-key "
                        f"and --csv-separator")
    column = header.index(key)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error:
            problems["bad_record"] += 1
            continue
        if not row:
            problems["empty"] += 1
        elif len(row) <= column:
            problems["bad_record"] += 1
        else:
            yield from _decoded(row[column], problems)


def _coco(stream: io.BufferedReader, source: Source, options: ReaderOptions, problems: Counter[str]) -> Iterator[str]:
    try:
        data = json.loads(stream.read().decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as error:
        raise UserError(f"{source.path}: not valid JSON ({error})") from error
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise UserError(f"{source.path}: not a COCO captions file (no 'annotations' list)")
    for annotation in annotations:
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if isinstance(caption, str):
            yield from _decoded(caption, problems)
        else:
            problems["bad_record"] += 1


def _jsonl(stream: io.BufferedReader, source: Source, options: ReaderOptions, problems: Counter[str]) -> Iterator[str]:
    key, found, missing = options.jsonl_caption_key, False, 0
    for line in stream:
        if not line.strip():
            problems["empty"] += 1
            continue
        try:
            record = json.loads(line.decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError:
            problems["bad_record"] += 1
            continue
        caption = record.get(key) if isinstance(record, dict) else None
        if isinstance(caption, str):
            found = True
            yield from _decoded(caption, problems)
        else:
            missing += 1
            problems["bad_record"] += 1
    if missing and not found:
        raise UserError(f"{source.path}: no record has a string {key!r} field (set --jsonl-caption-key)")


def _webdataset(
    stream: io.BufferedReader, source: Source, options: ReaderOptions, problems: Counter[str]
) -> Iterator[str]:
    shard = ShardMembers(source.path, problems, stream, data_of=("txt",))
    has_text: dict[str, bool] = {}  # sample key -> has a .txt member
    for member in shard:
        has_text[member.key] = has_text.get(member.key, False) or member.ext == "txt"
        if member.data is not None:
            for text in _decoded(member.data, problems):
                yield from text.splitlines() or [""]
    if shard.truncated and has_text:
        has_text.popitem()  # the sample at the break is the truncation's loss, not judged on its own
    problems.update("missing_caption" for text in has_text.values() if not text)
