"""Models: open_clip architectures, our shipped configs and tokenizers, and the one loader of CLIP models."""

from clipkd_dino.models.factory import (
    available_models,
    create_model,
    get_tokenizer,
    image_size,
    image_transforms,
    model_config,
)
from clipkd_dino.models.loading import LoadedCLIP, check_clip, load_clip

__all__ = ["LoadedCLIP", "available_models", "check_clip", "create_model", "get_tokenizer", "image_size",
           "image_transforms", "load_clip", "model_config"]
