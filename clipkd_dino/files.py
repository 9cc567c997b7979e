"""Atomic file writes: a crash or a kill never leaves a torn file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from clipkd_dino.errors import UserError


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(stream)` on a temporary file beside `path`, fsync it, then rename it over `path`.

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
            write(stream)
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
