"""Models: open_clip architectures, our shipped configs and tokenizers."""

from clipkd_dino.models.factory import (
    available_models,
    create_model,
    get_tokenizer,
    image_size,
    image_transforms,
    model_config,
)

__all__ = ["available_models", "create_model", "get_tokenizer", "image_size", "image_transforms", "model_config"]
