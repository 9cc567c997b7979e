"""Feature geometry the dino-loss acts on: how well features align with their class-mean direction."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_mean_cosine(features: torch.Tensor, labels: torch.Tensor,
                      class_means: torch.Tensor | None = None) -> float:
    """Mean cosine between each feature and the direction of its class mean (samples with label -1 ignored).

    features [N, D] unnormalised, labels [N]. The class means are those of `features` itself unless given [C, D]
    (e.g. the teacher's, for features already in the teacher's space).
    """
    valid = labels >= 0
    features, labels = features[valid].float(), labels[valid]
    if not len(labels):
        return float("nan")
    if class_means is None:  # a class's sum has the direction of its mean
        class_means = features.new_zeros(int(labels.max()) + 1, features.shape[1]).index_add_(0, labels, features)
    directions = F.normalize(class_means.float(), dim=-1)[labels]
    return float((F.normalize(features, dim=-1) * directions).sum(-1).mean())
