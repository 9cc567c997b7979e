"""Training objectives: modules that own the trainable parts and return a dict of named losses.

The trainer sums the dict; distillation objectives add their terms under their own names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipkd_dino.losses import clip_loss
from clipkd_dino.models.factory import PixelNormaliser
from clipkd_dino.train.distributed import all_gather_with_grad

MAX_LOGIT_SCALE = 100.0


class CLIPObjective(nn.Module):
    """Plain CLIP training: the symmetric InfoNCE loss over the global (all-gathered) batch."""

    views = None  # the model's own random transform (a distiller from a cache replays the cached views)
    num_views = 0
    uses_every_parameter = True  # every learnable part gets a gradient at every step (what DDP needs to know)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.pixels = model, PixelNormaliser(model)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: images [B, 3, H, W] (uint8 pixels), texts [B, L] token ids -> {"loss_task": scalar}."""
        image_features = F.normalize(self.model.encode_image(self.pixels(batch["images"])), dim=-1)
        text_features = F.normalize(self.model.encode_text(batch["texts"]), dim=-1)
        scale = self.model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        loss = clip_loss(all_gather_with_grad(image_features), all_gather_with_grad(text_features), scale)
        return {"loss_task": loss}
