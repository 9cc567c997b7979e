"""The CLIP task loss (symmetric InfoNCE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the image-text similarity matrix; pair i is the positive of row/column i.

    image_features, text_features: [N, D], L2-normalised. logit_scale: scalar, already exponentiated.
    Returns a scalar: (CE(scale * I T^T, arange) + CE(scale * T I^T, arange)) / 2.
    """
    logits = logit_scale * image_features @ text_features.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
