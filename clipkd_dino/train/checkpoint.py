"""Atomic checkpoints that plain open_clip can load.

Every file is a dict with `state_dict` (the CLIP model, open_clip key names) next to plain-typed extras, so
`open_clip.create_model_and_transforms(NAME, pretrained=PATH)` loads it with torch's safe `weights_only` loader.
`latest.pt` additionally holds what a resumed run needs (optimiser, scheduler, scaler, position in the epoch).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from clipkd_dino.errors import UserError


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """'latest' -> OUTPUT_DIR/checkpoints/latest.pt; anything else is a path."""
    path = output_dir / "checkpoints" / "latest.pt" if resume == "latest" else Path(resume)
    if not path.is_file():
        raise UserError(f"--resume: checkpoint not found: {path}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise UserError(f"cannot read checkpoint {path}: {error}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
