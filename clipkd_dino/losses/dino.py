"""The dino-loss (KD++ direction and norm): pull each student feature along its class-mean direction, with a norm
at least (1 + m) times the teacher's. Docs: docs/losses.md; formula: the guide, section 2."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

_EPS = 1e-12


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, class_means: torch.Tensor, labels: torch.Tensor, *,
              teacher_norm_scale: float = 0.0, p: float = 2,
              reduction: Literal["sample", "class"] = "sample") -> torch.Tensor:
    """term_i = 1 - <s_i, e_{y_i}> / max(||s_i||_p, (1 + m) ||t_i||_p), with e_k = c_k / ||c_k||_2.

    student: [N, D], not normalised (projected to the teacher dim). teacher: [N, D] (detached here).
    class_means: [C, D], unnormalised mean teacher feature per class. labels: [N] int in [0, C), -1 = ignored.
    teacher_norm_scale: m. p: order of the norms in the denominator (float, float('inf') allowed).
    reduction: "sample" = mean over valid samples; "class" = mean within each class, then over the classes present.
    Returns a scalar; 0 (still connected to `student`) when no label is valid.
    """
    valid = labels >= 0
    units = F.normalize(class_means.detach(), dim=-1)[labels.clamp(min=0)]
    norm_floor = (1 + teacher_norm_scale) * torch.linalg.vector_norm(teacher.detach(), ord=p, dim=-1)
    denominator = torch.maximum(torch.linalg.vector_norm(student, ord=p, dim=-1), norm_floor).clamp(min=_EPS)
    terms = torch.where(valid, 1 - (student * units).sum(dim=-1) / denominator, 0.0)
    weights = valid.to(terms.dtype)
    if reduction == "sample":
        return terms.sum() / weights.sum().clamp(min=1)
    if reduction == "class":
        sums = terms.new_zeros(class_means.shape[0]).index_add(0, labels.clamp(min=0), terms)
        counts = weights.new_zeros(class_means.shape[0]).index_add(0, labels.clamp(min=0), weights)
        return (sums / counts.clamp(min=1)).sum() / (counts > 0).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'sample' or 'class', got {reduction!r}")
