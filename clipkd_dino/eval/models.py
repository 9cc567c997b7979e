"""Any CLIP model for evaluation, each with its own tokenizer and image preprocessing.

- an open_clip architecture or a shipped config with `pretrained` = a local file or an open_clip tag;
- a clipkd training checkpoint alone (teacher or student: its `model_name` says the architecture);
- `local-dir:DIR`, an open_clip folder (what `clipkd export` writes);
- `hf:DIR`, a Hugging Face `CLIPModel` saved with `save_pretrained` (with its tokenizer and image processor), run
  through `transformers` (imported only for these).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from clipkd_dino.errors import UserError
from clipkd_dino.eval.encode import Tokenizer, Transform
from clipkd_dino.models.factory import checkpoint_model_name, create_model_and_transform, get_tokenizer

HF_PREFIX = "hf:"
LOCAL_DIR_PREFIX = "local-dir:"


@dataclass
class EvalModel:
    """A model with `encode_image` / `encode_text`, its tokenizer and eval transform; `name` as resolved."""

    name: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    transform: Transform


def load_eval_model(name: str | None, pretrained: str | None = None, device: str | torch.device = "cpu") -> EvalModel:
    """The model `name` (see the module doc) on `device` in fp32; a one-line UserError when it cannot be loaded."""
    if name and name.startswith(HF_PREFIX):
        return _hf_model(Path(name[len(HF_PREFIX):]), torch.device(device))
    if name and name.startswith(LOCAL_DIR_PREFIX):
        config = Path(name[len(LOCAL_DIR_PREFIX):]) / "open_clip_config.json"
        if not config.is_file():
            raise UserError(f"{name}: not an open_clip model folder ({config} not found)")
    if not name:
        if not pretrained:
            raise UserError("give a model: NAME with a checkpoint or tag, a training checkpoint, local-dir:DIR "
                            "or hf:DIR")
        name = checkpoint_model_name(pretrained)
    model, transform = create_model_and_transform(name, pretrained, device)
    return EvalModel(name, model, get_tokenizer(name), transform)


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


def _hf_model(folder: Path, device: torch.device) -> EvalModel:
    if not (folder / "config.json").is_file():
        raise UserError(f"hf:{folder}: not a saved transformers model ({folder / 'config.json'} not found)")
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"hf:{folder}: cannot load ({str(error).splitlines()[0]})") from None
    context_length = model.config.text_config.max_position_embeddings
    return EvalModel(f"hf:{folder.resolve()}", HFCLIP(model).to(device), HFTokenizer(tokenizer, context_length),
                     HFImageTransform(processor))


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose `pooler_output` is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
