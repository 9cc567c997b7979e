"""Loss functions: small, pure, shapes in the docstrings. Definitions and choices: docs/losses.md."""

from clipkd_dino.losses.classification import dkd_loss, hcl_loss, kd_loss, kd_warmup_factor
from clipkd_dino.losses.clip import clip_loss
from clipkd_dino.losses.clipkd import afd_loss, crd_loss, fd_loss, gd_loss, icl_loss
from clipkd_dino.losses.dino import dino_loss

__all__ = ["afd_loss", "clip_loss", "crd_loss", "dino_loss", "dkd_loss", "fd_loss", "gd_loss", "hcl_loss", "icl_loss",
           "kd_loss", "kd_warmup_factor"]
