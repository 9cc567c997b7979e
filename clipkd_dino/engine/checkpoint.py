"""Atomic checkpoints that plain open_clip can load.

Every file is a dict with `state_dict` (the CLIP model, open_clip key names) next to plain-typed extras, so
`open_clip.create_model_and_transforms(NAME, pretrained=PATH)` loads it with torch's safe `weights_only` loader.
`latest.pt` additionally holds what a resumed run needs (optimiser, scheduler, scaler, position in the epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipkd_dino.errors import UserError
from clipkd_dino.files import read_torch_file, write_atomic


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save through `write_atomic`: a crash never leaves a torn checkpoint."""
    write_atomic(path, lambda stream: torch.save(payload, stream))


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """'latest' -> OUTPUT_DIR/checkpoints/latest.pt; 'auto' -> the same when it exists, else None (a fresh start:
    what `torchrun --max-restarts N ... --resume auto` needs); anything else is a path."""
    latest = output_dir / "checkpoints" / "latest.pt"
    if resume == "auto":
        return latest if latest.is_file() else None
    path = latest if resume == "latest" else Path(resume)
    if not path.is_file():
        raise UserError(f"--resume: checkpoint not found: {path}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return read_torch_file(path)

