"""The one reader of tar archives (webdataset shards): training, labelling, evaluation and concept pools.

`ShardMembers` gives a shard's file members in order, each with its webdataset sample key (the member's name up to
the first dot of its base name) and extension (the rest, lower case); members without an extension are no part of a
sample. It reads either the file itself, headers only (unbuffered: each header is one 512-byte read and member data
is skipped by seeking, so indexing costs ~1% of the data), or a stream front to back (compressed or not, e.g. one
that hashes what it reads), then with the data of the extensions asked for. `read_member` reads one member later,
by offset, in one read of its exact size from a shard opened by `open_shard`.

Faults are counted, never raised: a shard that is missing or not a tar (`not_a_tar`), empty (`empty_file`), or
that ends early (`truncated_shard`, once; the members before the break are given and `truncated` is set).
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class TarMember:
    """A file member of a shard: its name, sample key, extension, where its data lies (in the uncompressed archive)
    and the data itself when it was asked for."""

    name: str
    key: str
    ext: str
    offset: int
    size: int
    data: bytes | None = None


class ShardMembers:
    """The file members of shard `path`, in order, counting its faults in `problems`. Read from `stream` when given
    (front to back; the data of the members whose extension is in `data_of` comes with them), else from the file,
    headers only."""

    def __init__(self, path: str | Path, problems: Counter, stream: BinaryIO | None = None,
                 data_of: Collection[str] = ()) -> None:
        self.path, self.problems, self.stream, self.data_of = path, problems, stream, data_of
        self.truncated = False

    def __iter__(self) -> Iterator[TarMember]:
        try:
            end = os.stat(self.path).st_size  # a truncated last member lies past the end of the file
        except OSError:
            self.problems["not_a_tar"] += 1
            return
        if end == 0:
            self.problems["empty_file"] += 1
            return
        with contextlib.ExitStack() as stack:
            try:
                archive = stack.enter_context(self._open(stack))
            except (tarfile.TarError, OSError):
                self.problems["not_a_tar"] += 1
                return
            while (member := self._next(archive, end)) is not None:
                yield member

    def _open(self, stack: contextlib.ExitStack) -> tarfile.TarFile:
        if self.stream is not None:
            return tarfile.open(fileobj=self.stream, mode="r|*")
        return tarfile.open(fileobj=stack.enter_context(open_shard(self.path)), mode="r:")

    def _next(self, archive: tarfile.TarFile, end: int) -> TarMember | None:
        """The next file member with an extension; None at the end of the archive or at a break (counted)."""
        try:
            while (info := archive.next()) is not None:
                if self.stream is None and info.offset_data + info.size > end:
                    break  # its data was cut (read from a stream, tarfile itself finds that)
                directory, _, name = info.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if info.isfile() and dot:
                    ext = ext.lower()
                    data = archive.extractfile(info).read() if ext in self.data_of else None
                    return TarMember(info.name, f"{directory}/{stem}" if directory else stem, ext,
                                     info.offset_data, info.size, data)
            else:
                return None
        except (tarfile.TarError, EOFError, OSError):
            pass
        self.truncated = True
        self.problems["truncated_shard"] += 1
        return None


def open_shard(path: str | Path) -> BinaryIO:
    """Shard `path` opened to read members by offset: unbuffered, so each member costs one read of its exact size."""
    return open(path, "rb", buffering=0)


def read_member(shard: BinaryIO, offset: int, size: int) -> bytes:
    """The `size` bytes of data at `offset` of an open shard (a member found by `ShardMembers`)."""
    shard.seek(offset)
    return shard.read(size)
