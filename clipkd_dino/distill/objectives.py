"""Training objectives: modules that own the trainable parts and return a dict of named losses.

The trainer sums the dict; distillation objectives add their terms under their own names. An objective's
`batch_wide` names the losses that see the whole accumulated batch under gradient accumulation (the contrastive
ones), the others see their micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipkd_dino.engine.distributed import all_gather_with_grad
from clipkd_dino.losses import clip_loss
from clipkd_dino.losses.clip import learnable_scale
from clipkd_dino.models.factory import PixelNormaliser


class CLIPObjective(nn.Module):
    """Plain CLIP training: the symmetric InfoNCE loss over the global (all-gathered) batch."""

    views = None  # the model's own random transform (a distiller from a cache replays the cached views)
    num_views = 0
    uses_every_parameter = True  # every learnable part gets a gradient at every step (what DDP needs to know)
    batch_wide = frozenset({"loss_task"})  # the losses that see the whole accumulated batch

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.pixels = model, PixelNormaliser(model)

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: images [B, 3, H, W] (uint8 pixels), texts [B, L] token ids -> normalised embeddings."""
        return {"image": F.normalize(self.model.encode_image(self.pixels(batch["images"])), dim=-1),
                "text": F.normalize(self.model.encode_text(batch["texts"]), dim=-1)}

    def forward(self, batch: dict, accumulated: list[dict] | None = None, index: int = 0) -> dict[str, torch.Tensor]:
        """{"loss_task": scalar}; with `accumulated` (see `CLIPDistiller.forward`) over the accumulated batch."""
        local = self.embed(batch)
        whole = with_micro_batch(accumulated, local, index) if accumulated else local
        scale = self.model.logit_scale
        if accumulated and index != len(accumulated) - 1:  # its gradient from the last pass only
            scale = scale.detach()
        return {"loss_task": clip_loss(all_gather_with_grad(whole["image"]), all_gather_with_grad(whole["text"]),
                                       learnable_scale(scale))}


def with_micro_batch(accumulated: list[dict], local: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The embeddings of every micro-batch of a step concatenated, micro-batch `index`'s replaced by `local` (the
    one with a gradient): what the contrastive terms see under gradient accumulation."""
    return {key: torch.cat([local[key] if m == index else part[key] for m, part in enumerate(accumulated)])
            for key in local}
