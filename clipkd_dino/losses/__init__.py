"""Loss functions: small, pure, shapes in the docstrings."""

from clipkd_dino.losses.clip import clip_contrastive_loss

__all__ = ["clip_contrastive_loss"]
