"""Feature extraction for evaluation: images through a DataLoader, texts in tokenised batches.

Features are the model's raw (unnormalised) embeddings, returned as float32 on the CPU. The model runs in eval mode
without gradients under `autocast(device, precision)`; the train/eval flag of every submodule is restored afterwards,
so the trainer can call this between epochs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipkd_dino.errors import UserError
from clipkd_dino.runtime import autocast

Tokenizer = Callable[[list[str]], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]


class ImageFiles(Dataset):
    """Image files -> transformed tensors."""

    def __init__(self, paths: Sequence[str | Path], transform: Transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image)
        except OSError as error:
            raise UserError(f"cannot read image {path}: {error}") from None


@contextlib.contextmanager
def inference(model: torch.nn.Module, device: torch.device, precision: str) -> Iterator[None]:
    """Eval mode, no gradients, autocast; restores each submodule's train/eval flag on exit."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), autocast(device, precision):
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def encode_images(
    model: torch.nn.Module,
    paths: Sequence[str | Path],
    transform: Transform,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
) -> torch.Tensor:
    """`model.encode_image` of each image file after `transform`: [len(paths), D] float32 on the CPU."""
    loader = DataLoader(
        ImageFiles(paths, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    with inference(model, device, precision):
        return torch.cat([_cpu(model.encode_image(batch.to(device, non_blocking=True))) for batch in loader])


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
) -> torch.Tensor:
    """`model.encode_text` of the tokenised texts, `batch_size` at a time: [len(texts), D] float32 on the CPU."""
    texts = list(texts)
    with inference(model, device, precision):
        return torch.cat(
            [
                _cpu(model.encode_text(tokenizer(texts[start : start + batch_size]).to(device)))
                for start in range(0, len(texts), batch_size)
            ]
        )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _cpu(features: torch.Tensor) -> torch.Tensor:
    return features.float().cpu()
