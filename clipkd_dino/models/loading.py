"""Any CLIP model with its tokenizer, preprocessing and the file its weights come from: the one loader of teachers
and evaluated models.

- an open_clip architecture or a shipped config, with `pretrained` = a local file, an open_clip tag (from the Hugging
  Face cache when offline) or None (random weights);
- a clipkd training checkpoint alone (name None: its `model_name` says the architecture);
- `local-dir:DIR`, an open_clip folder (what `clipkd export` writes);
- `hf:DIR`, a Hugging Face `CLIPModel` saved with `save_pretrained` (with its tokenizer and image processor), run
  through `transformers` (imported only for these).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from clipkd_dino.errors import ConfigError
from clipkd_dino.models.factory import (
    Tokenizer,
    Transform,
    build,
    checkpoint_model_name,
    get_tokenizer,
    image_normalisation,
    image_size,
    model_config,
    model_folder,
    resolve,
)

HF_PREFIX = "hf:"


@dataclass
class LoadedCLIP:
    """A model with `encode_image(pixels)` / `encode_text(tokens)` in fp32 on its device, and what goes with it.

    `name`: as resolved (the checkpoint's architecture, `NAME-quickgelu` for a QuickGELU tag, `hf:` + absolute
    folder); `transform`: the eval preprocessing (PIL image -> [3, H, W]); `logit_scale`: exp of the model's;
    `weights_file`: the local file the weights were read from (None: random weights, or a sharded `hf:` folder).
    """

    name: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    transform: Transform
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embed_dim: int
    logit_scale: float
    context_length: int
    weights_file: Path | None


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's state dict: the same weights give the same
    digest whatever file (format, container, location) they were read from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_clip(name: str | None, pretrained: str | None) -> None:
    """Whether `load_clip(name, pretrained)` can work, loading no weights: a one-line ConfigError for an unknown
    name, a missing file or folder, an unknown tag (listing the tags) or a tag whose weights are not in the Hugging
    Face cache while HF_HUB_OFFLINE is set."""
    if name and name.startswith(HF_PREFIX):
        _hf_folder(name, pretrained)
    else:
        resolve(_architecture(name, pretrained), pretrained, download=False)


def load_clip(name: str | None, pretrained: str | None = None, device: str | torch.device = "cpu") -> LoadedCLIP:
    """The model `name` with weights `pretrained` (see the module doc) on `device` in fp32; a one-line ConfigError
    when it cannot be loaded. A TorchScript file (OpenAI's release) under a GELU architecture logs a warning."""
    device = torch.device(device)
    if name and name.startswith(HF_PREFIX):
        return _load_hf(_hf_folder(name, pretrained), device)
    resolved = resolve(_architecture(name, pretrained), pretrained)
    model, transform = build(resolved, device)
    mean, std = image_normalisation(model)
    return LoadedCLIP(resolved.name, model, get_tokenizer(resolved.name), transform, image_size(model), mean, std,
                      model_config(resolved.name)["embed_dim"], model.logit_scale.detach().exp().item(),
                      model.context_length, resolved.weights_file)


def _architecture(name: str | None, pretrained: str | None) -> str:
    if name:
        return name
    if not pretrained:
        raise ConfigError("give a model: NAME with a checkpoint or tag, a training checkpoint, local-dir:DIR or hf:DIR")
    return checkpoint_model_name(pretrained)


def _hf_folder(name: str, pretrained: str | None) -> Path:
    return model_folder(name, HF_PREFIX, "config.json", "a saved transformers model", pretrained)


def _load_hf(folder: Path, device: torch.device) -> LoadedCLIP:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"hf:{folder}: cannot load ({str(error).splitlines()[0]})") from None
    config, folder = model.config, folder.absolute()
    weights = [folder / file for file in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME) if (folder / file).is_file()]
    return LoadedCLIP(f"hf:{folder.resolve()}", HFCLIP(model).to(device),
                      HFTokenizer(tokenizer, config.text_config.max_position_embeddings), HFImageTransform(processor),
                      config.vision_config.image_size, tuple(processor.image_mean), tuple(processor.image_std),
                      config.projection_dim, model.logit_scale.detach().exp().item(),
                      config.text_config.max_position_embeddings, weights[0] if weights else None)


class HFCLIP(torch.nn.Module):
    """A transformers `CLIPModel` behind open_clip's `encode_image(pixels)` / `encode_text(tokens)`.

    `tokens` is `HFTokenizer`'s [B, 2, L] stack of input ids and attention mask.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = tokens.unbind(dim=1)
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class HFTokenizer:
    """A transformers tokenizer padded to the text tower's length; returns [B, 2, L] (input ids, attention mask)."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        encoded = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                 max_length=self.context_length, return_tensors="pt")
        return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1)


class HFImageTransform:
    """A transformers image processor as a PIL image -> [3, H, W] transform (picklable for loader workers)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({self.processor.to_json_string()})"


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose `pooler_output` is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
