"""What every classifier of the zoo shares: the output dict, the base class and a residual stage.

A classifier's forward returns a dict:

- "logits": [B, num_classes]
- "pooled": [B, feature_dim], the pooled penultimate feature that the final Linear reads
- "stages": feature maps [B, C_i, H_i, W_i] from shallow to deep (mdistiller's "feats")
- "preact_stages": the same maps before their final ReLU (mdistiller's "preact_feats"); an entry equals its
  "stages" entry where the architecture has no ReLU there. As in mdistiller, the stem entry (index 0) is the same
  tensor in both lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ClassifierOutput = dict[str, Tensor | list[Tensor]]


class Classifier(nn.Module):
    """Base of the zoo. Subclasses set `feature_dim` (width of "pooled") and `stage_channels` (channels of each
    "stages" map, in order)."""

    feature_dim: int
    stage_channels: list[int]


def classifier_output(logits: Tensor, pooled: Tensor, stages: list[Tensor],
                      preact_stages: list[Tensor] | None = None) -> ClassifierOutput:
    """The output dict; `preact_stages` defaults to `stages` (architectures without a ReLU at the stage ends)."""
    return {"logits": logits, "pooled": pooled, "stages": stages,
            "preact_stages": list(stages) if preact_stages is None else preact_stages}


def global_pool(x: Tensor) -> Tensor:
    """Global average pooling to [B, C]. The references pool with a fixed window (8 or 4) sized for 32 px inputs;
    adaptive pooling gives the same result there and also works for other input sizes."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ResidualStage(nn.Sequential):
    """A sequence of blocks that each return (output, pre-ReLU output); returns the last block's pair."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        preact = x
        for block in self:
            x, preact = block(x)
        return x, preact


def staged_forward(stem: Tensor, layers: tuple[nn.Module, ...], head: nn.Linear) -> ClassifierOutput:
    """The output dict of a stem followed by `ResidualStage`-like layers (each returns (output, pre-ReLU output))
    and global pooling into `head`."""
    stages, preacts = [stem], [stem]
    out = stem
    for layer in layers:
        out, preact = layer(out)
        stages.append(out)
        preacts.append(preact)
    pooled = global_pool(out)
    return classifier_output(head(pooled), pooled, stages, preacts)


def init_weights(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """The references' initialisation: He-normal (fan-out) convolutions with zero biases, BatchNorm at identity;
    Linear weights ~ N(0, linear_std) when given (else PyTorch's default), zero Linear biases when `linear_std`
    or `zero_linear_bias`."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and (linear_std is not None or zero_linear_bias):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
