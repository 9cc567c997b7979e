"""Projectors from the student's feature dim to the teacher's: CLIP-KD's plain Linear and KD++'s dino projector."""

from __future__ import annotations

from torch import nn


def linear_projector(d_in: int, d_out: int) -> nn.Module:
    """CLIP-KD's projector: Linear(d_in, d_out), identity when the dims match. [N, d_in] -> [N, d_out]."""
    return nn.Linear(d_in, d_out) if d_in != d_out else nn.Identity()


def dino_projector(d_in: int, d_out: int) -> nn.Module:
    """KD++'s projector for the dino-loss: BatchNorm1d -> Dropout(0.5) -> Linear (identity when dims match).
    [N, d_in] -> [N, d_out]; it feeds only the dino-loss and is dropped for inference."""
    if d_in == d_out:
        return nn.Identity()
    return nn.Sequential(nn.BatchNorm1d(d_in), nn.Dropout(0.5), nn.Linear(d_in, d_out))
