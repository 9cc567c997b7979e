"""open_clip-style CSV files (an image path column and a caption column) held in a few numpy arrays.

The one reader of image-caption CSV files: training rows (`pairs.CsvPairs`) and the images of the labelling and
evaluation passes (`samples.py`). At CC12M's 13M rows a Python object per field (~580 bytes a row) would cost
~7 GiB per process, copied into every forked loader worker by reference counting; a `CsvTable` holds the two
columns' text in one uint8 buffer plus 25 bytes a row of numpy arrays, which forked workers only read, so share.
Fields are decoded to `str` when accessed.

Rows are csv.DictReader's with the given delimiter (its quoting; an empty line is no row; a field missing from a
short row reads as ""), read from the file's bytes: bytes that are not UTF-8 are kept (decoded with
surrogateescape) and their row is flagged, not dropped. While the file holds no quote, carriage return or NUL byte,
its lines are split at separators directly (what csv.reader does on such text), 4 MiB at a time; from the first
block that holds one, the csv module reads the rest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
from pathlib import Path
from typing import Iterator

import numpy as np

from clipkd_dino.data.faults import decode_text
from clipkd_dino.errors import ConfigError

BLOCK_BYTES = 1 << 22  # the per-row Python objects of parsing live for a block of the file (4 MiB)
CSV_ONLY = (b'"', b"\r", b"\0")  # bytes that mean more than text to csv.reader (quotes, line ends)
UTF8, USABLE = 1, 2  # row flags: its fields are UTF-8; also its caption is not blank


class CsvTable:
    """The rows of a CSV file. Row i's image path and caption are text[bounds[2i]:bounds[2i + 1]] and
    text[bounds[2i + 1]:bounds[2i + 2]] (UTF-8 bytes); per row, `flags` (UTF8, USABLE), `caption_index` (the usable
    captions of the same image in the rows before it, as the teacher cache orders them) and `image` (the number of
    its image path, in order of first appearance). Every attribute is a numpy array."""

    def __init__(self, text: np.ndarray, bounds: np.ndarray, flags: np.ndarray, caption_index: np.ndarray,
                 image: np.ndarray) -> None:
        self.text, self.bounds, self.flags, self.caption_index, self.image = text, bounds, flags, caption_index, image

    @classmethod
    def read(cls, path: str | Path, separator: str = "\t", img_key: str = "filepath", caption_key: str = "title",
             hint: str = "") -> CsvTable:
        """The table of CSV file `path`; a missing column is a ConfigError naming the file and the column, then
        `hint`."""
        records = _records(Path(path), separator)
        header = [name.decode("utf-8", "surrogateescape") for name in next(records)]
        columns = []
        for key in (img_key, caption_key):
            if key not in header:
                raise ConfigError(f"{path}: column {key!r} not found (columns: {header}){hint}")
            columns.append(len(header) - 1 - header[::-1].index(key))  # csv.DictReader keeps a name's last column
        # growing bytearrays, not lists of pieces: no copy at the end, and freed pieces leave no heap fragments
        text, bounds, flags, digests = bytearray(), bytearray(8), bytearray(), bytearray()
        for block in records:
            fields = [row[c] if c < len(row) else b"" for row in block if row for c in columns]
            bounds += (len(text) + np.cumsum(np.fromiter(map(len, fields), np.int64, len(fields)))).tobytes()
            text += b"".join(fields)
            flags += bytes(_flags(fields))
            digests += b"".join(hashlib.blake2b(image, digest_size=16).digest() for image in fields[::2])
        flags = np.frombuffer(flags, np.uint8)
        image, caption_index = _images(np.frombuffer(digests, "<u8").reshape(-1, 2), flags & USABLE > 0)
        return cls(np.frombuffer(text, np.uint8), np.frombuffer(bounds, np.int64), flags, caption_index, image)

    def __len__(self) -> int:
        return len(self.flags)

    def image_path(self, row: int) -> str:
        """Row `row`'s image path as written (bytes that are not UTF-8 as surrogate escapes)."""
        return self._field(2 * row)

    def caption(self, row: int) -> str:
        return self._field(2 * row + 1)

    def utf8(self, row: int) -> bool:
        return bool(self.flags[row] & UTF8)

    def usable(self, row: int) -> bool:
        return bool(self.flags[row] & USABLE)

    def image_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, starts): the UTF-8 rows grouped by image path, images in the order of their first UTF-8 row; image
        k's rows, in file order, are rows[starts[k]:starts[k + 1]]."""
        rows = np.flatnonzero(self.flags & UTF8)
        rows = rows[np.argsort(self.image[rows], kind="stable")]
        new = _firsts(self.image[rows][:, None])
        group = np.cumsum(new) - 1
        place = np.empty(int(new.sum()), np.int64)  # group -> its image's place, by first UTF-8 row
        place[np.argsort(rows[new])] = np.arange(len(place))
        rows = rows[np.argsort(place[group], kind="stable")]
        return rows, np.r_[0, np.cumsum(np.bincount(place[group], minlength=len(place)))]

    def _field(self, number: int) -> str:
        return self.text[self.bounds[number]:self.bounds[number + 1]].tobytes().decode("utf-8", "surrogateescape")


def _records(path: Path, separator: str) -> Iterator[list]:
    """The header record, then lists of records (a record is a list of bytes fields, [] for an empty line), as
    csv.reader splits the file."""
    sep = separator.encode("utf-8")
    header, start, rest = True, 0, b""  # start: the file offset of the first line not yet split
    with open(path, "rb") as handle:
        while len(sep) == 1 and sep not in CSV_ONLY:
            data = handle.read(BLOCK_BYTES)
            lines = rest + data
            end = lines.rfind(b"\n") + 1 if data else len(lines)
            lines, rest = lines[:end], lines[end:]
            if any(byte in lines for byte in CSV_ONLY):
                break
            if lines:
                block = [line.split(sep) if line else [] for line in lines.split(b"\n")]
                if lines.endswith(b"\n"):
                    block.pop()  # the empty text after the last newline
                if header:
                    yield block.pop(0)
                    header = False
                yield block
                start += len(lines)
            if not data:
                if header:
                    yield []
                return
        handle.seek(start)
        rows = csv.reader(io.TextIOWrapper(handle, "utf-8", "surrogateescape", newline=""), delimiter=separator)
        rows = ([field.encode("utf-8", "surrogateescape") for field in row] for row in rows)
        if header:
            yield next(rows, [])
        while block := list(itertools.islice(rows, 100_000)):
            yield block


def _flags(fields: list[bytes]) -> Iterator[int]:
    """The flags of the rows of `fields` (image, caption, image, caption, ...): a row is UTF-8 when both its fields
    are (`faults.decode_text`, the policy of every caption reader)."""
    utf8 = decode_text(b"\n".join(fields)) is not None  # most blocks: one check for all rows
    for image, caption in zip(fields[::2], fields[1::2]):
        text = decode_text(caption) if utf8 or decode_text(image) is not None else None
        yield 0 if text is None else UTF8 | (USABLE if text.strip() else 0)


def _images(hashes: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, caption_index) per row from the rows' image path hashes (uint64 [N, 2]) and usable flags."""
    # the results first: below the temporaries on the heap, which can then be given back to the system when freed
    image, caption_index = np.empty(len(hashes), np.int32), np.empty(len(hashes), np.int32)
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))  # stable: an image's rows stay in file order
    new = _firsts(hashes[order])
    group = np.cumsum(new) - 1
    before = np.cumsum(usable[order]) - usable[order]  # usable rows before, in sorted order
    caption_index[order] = before - before[new][group]
    number = np.empty(int(new.sum()), np.int32)  # group -> its image's number, by first appearance
    number[np.argsort(order[new])] = np.arange(len(number))
    image[order] = number[group]
    return image, caption_index


def _firsts(keys: np.ndarray) -> np.ndarray:
    """bool [N]: where sorted `keys` ([N, K]) start a run of equal rows."""
    new = np.ones(len(keys), bool)
    new[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    return new
