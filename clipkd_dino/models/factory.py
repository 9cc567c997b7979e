"""Model factory: open_clip architectures plus the configs shipped in `model_configs/`.

Importing this module registers our configs with open_clip, so `open_clip.create_model_and_transforms(NAME,
pretrained=PATH)` works for them too. A model whose text vocabulary is smaller than open_clip's uses the shipped
compact vocabulary of that size (see `tokenizer.py`); all other models use open_clip's tokenizer.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Callable, Iterator

import open_clip
import torch
from torchvision import transforms as T

from clipkd_dino.errors import ConfigError
from clipkd_dino.files import load_error_reason, read_torch_file
from clipkd_dino.models.tokenizer import CompactTokenizer, shipped_vocabularies

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
OPENCLIP_VOCAB_SIZE = 49408
open_clip.add_model_config(MODEL_CONFIG_DIR)

Tokenizer = Callable[[list[str]], torch.Tensor]


def available_models() -> list[str]:
    return open_clip.list_models()


def model_config(name: str) -> dict:
    """The architecture config of `name`; ConfigError when open_clip does not know it."""
    config = open_clip.get_model_config(name)
    if config is None:
        raise ConfigError(
            f"unknown model name {name!r}: use an open_clip architecture or a config in {MODEL_CONFIG_DIR} "
            f"(e.g. {', '.join(sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json')))})"
        )
    return config


def check_pretrained(path: str | None) -> None:
    if path and not Path(path).is_file():
        raise ConfigError(f"pretrained checkpoint not found: {path}")


@contextlib.contextmanager
def _loading(name: str, pretrained: str | None) -> Iterator[None]:
    """Turn open_clip's loading errors into one-line ConfigErrors naming the model and the file."""
    try:
        yield
    # weights not cached offline, a foreign state dict, a pickle torch.load(weights_only=True) refuses, ...
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as error:
        raise ConfigError(f"cannot load {name!r} with pretrained={pretrained!r}: {load_error_reason(error)}") from None


def create_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An open_clip CLIP model in fp32 on `device`, optionally loaded from a local checkpoint file."""
    model_config(name)
    check_pretrained(pretrained)
    with _loading(name, pretrained):
        return open_clip.create_model(name, pretrained=pretrained, device=device)


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer that matches the text tower of model `name`."""
    text_cfg = model_config(name)["text_cfg"]
    vocab_size = text_cfg.get("vocab_size", OPENCLIP_VOCAB_SIZE)
    if vocab_size == OPENCLIP_VOCAB_SIZE or "hf_tokenizer_name" in text_cfg:
        return open_clip.get_tokenizer(name)
    for token_ids in shipped_vocabularies().values():
        if len(token_ids) == vocab_size:
            return CompactTokenizer(token_ids, context_length=text_cfg.get("context_length", 77))
    raise ConfigError(f"model {name!r} has a text vocabulary of {vocab_size} tokens and no shipped vocabulary fits")


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def image_normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's input normalisation (OpenAI's when the model does not say)."""
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return tuple(mean), tuple(std)


def image_transforms(model: torch.nn.Module, augment: bool = True, crop_scale: tuple[float, float] = (0.9, 1.0)):
    """(train, eval) transforms for the model's input size and normalisation.

    Train: RandomResizedCrop(scale=crop_scale) when `augment`, else the eval transform.
    Eval: resize the short side, centre crop. Both convert to RGB and normalise with the model's mean/std.
    """
    size = image_size(model)
    mean, std = image_normalisation(model)
    finish = [T.Lambda(_to_rgb), T.ToTensor(), T.Normalize(mean, std)]
    bicubic = T.InterpolationMode.BICUBIC
    eval_tf = T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size), *finish])
    if not augment:
        return eval_tf, eval_tf
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=crop_scale, interpolation=bicubic), *finish])
    return train_tf, eval_tf


def _to_rgb(image):
    return image.convert("RGB")


def create_model_and_transform(name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """(model in fp32 on `device`, its own eval preprocessing), through open_clip.

    `name`: an open_clip architecture, a shipped config, or `local-dir:DIR` (e.g. written by `clipkd export`);
    `pretrained`: a local checkpoint file or one of open_clip's tags for `name` (from its cache when offline).
    """
    model_config(name)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained and not Path(pretrained).is_file() and pretrained not in tags:
        raise ConfigError(f"pretrained checkpoint not found: {pretrained} (open_clip tags of {name!r}: "
                          f"{', '.join(tags) or 'none'})")
    with _loading(name, pretrained):
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model, transform


def checkpoint_model_name(path: str | Path) -> str:
    """The architecture name stored in a clipkd training checkpoint (`model_name`)."""
    check_pretrained(str(path))
    checkpoint = read_torch_file(path, mmap=True)
    name = checkpoint.get("model_name") if isinstance(checkpoint, dict) else None
    if not isinstance(name, str):
        raise ConfigError(f"{path} does not name its architecture (no 'model_name'): give the model name too")
    return name
