"""Atomic file writes: a crash or a kill never leaves a torn file behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from clipkd_dino.errors import UserError


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(stream)` on a temporary file beside `path`, fsync it, then rename it over `path` (`atomic_file`)."""
    with atomic_file(path) as stream:
        write(stream)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary stream to a temporary file beside `path`, fsynced and renamed over `path` when the block ends.

    A failed write (a full disk, an unwritable folder) removes the temporary file and raises a UserError naming
    `path`; whatever `path` held before is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror or error}; the file there before, if any, is "
                        "intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NpyWriter:
    """Appends rows to a `.npy` file whose dtype and shape are known up front (see `atomic_npy`)."""

    def __init__(self, stream: IO[bytes], dtype, shape: tuple[int, ...]) -> None:
        import numpy as np

        self.stream, self.dtype, self.shape = stream, np.dtype(dtype), shape
        self.expected, self.written = int(np.prod(shape)), 0
        np.lib.format.write_array_header_1_0(stream, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": shape})

    def write(self, rows) -> None:
        import numpy as np

        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self.stream.write(rows.data)
        self.written += rows.size


@contextlib.contextmanager
def atomic_npy(path: Path, dtype, shape: tuple[int, ...]) -> Iterator[NpyWriter]:
    """A `.npy` file of `dtype` and `shape` written front to back, row blocks at a time (`writer.write(rows)`), so
    an array larger than memory streams to disk without a memory map; atomic as `atomic_file`."""
    with atomic_file(path) as stream:
        writer = NpyWriter(stream, dtype, shape)
        yield writer
        if writer.written != writer.expected:
            raise ValueError(f"{path}: {writer.written} values written, the header says {writer.expected}")


def write_json_atomic(path: Path, data: Any, **dump_options: Any) -> None:
    """`data` as JSON (indent 2 unless `dump_options` say otherwise), newline-terminated, written atomically."""
    text = json.dumps(data, **{"indent": 2, **dump_options}) + "\n"
    write_atomic(path, lambda stream: stream.write(text.encode("utf-8")))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_torch_file(path: str | Path, what: str = "checkpoint", safe_globals: tuple = (), mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU. A file that cannot be read is a one-line UserError naming
    it; a pickle holding anything but tensors, containers and `safe_globals` is refused, since loading it could
    run code."""
    import torch

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # unpickling and zip errors alike mean: not a checkpoint we can read safely
        raise UserError(f"cannot read {what} {path}: {load_error_reason(error)}") from None


def load_error_reason(error: Exception) -> str:
    """Why `torch.load(weights_only=True)` failed, in one line: a refused pickle says so, anything else gives the
    first line of its message."""
    if "Weights only load failed" in str(error):
        return "it holds pickled objects other than weights, refused since loading them could run code"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
