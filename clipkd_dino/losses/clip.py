"""The CLIP task loss (symmetric InfoNCE) and the helpers the distillation losses share with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Scale = torch.Tensor | float
MAX_LOGIT_SCALE = 100.0


def learnable_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """A learnable logit scale's multiplier: exp(log_scale) clamped to MAX_LOGIT_SCALE (CLIP's, ICL's). Scalar."""
    return log_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def similarity_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: Scale) -> torch.Tensor:
    """image [N, D], text [M, D], any norm -> logit_scale * cos(image_i, text_j), [N, M]."""
    return logit_scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def diagonal_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, N] -> scalar mean over rows of CE(row i, target i)."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scale) -> torch.Tensor:
    """Symmetric InfoNCE; pair i is the positive of row i and of column i.

    image_features, text_features: [N, D], any norm (L2-normalised here). logit_scale: scalar multiplier,
    already exponentiated. Returns a scalar: (CE(Z, arange) + CE(Z^T, arange)) / 2 with Z = logit_scale * I T^T.
    """
    logits = similarity_logits(image_features, text_features, logit_scale)
    return (diagonal_cross_entropy(logits) + diagonal_cross_entropy(logits.t())) / 2
