"""Feature extraction for evaluation: images (files or shard members) through a DataLoader, texts in batches.

Features are the model's raw (unnormalised) embeddings, returned as float32 on the CPU. The model runs in eval mode
without gradients under `autocast(device, precision)`; the train/eval flag of every submodule is restored afterwards,
so the trainer can call this between epochs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from clipkd_dino.data.faults import BadSample, load_image
from clipkd_dino.data.loader import batches as loader_batches
from clipkd_dino.data.loader import data_loader
from clipkd_dino.errors import UserError
from clipkd_dino.eval.sources import ShardMember
from clipkd_dino.runtime import autocast

Tokenizer = Callable[[list[str]], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]
ImageRef = str | Path | ShardMember


class ImageFiles(Dataset):
    """Images (file paths or shard members) -> (index, transformed tensor), or (index, skip reason) when `skip_bad`
    and the image cannot be used (`samples.load_image`); without `skip_bad` that is a UserError naming it."""

    def __init__(self, images: Sequence[ImageRef], transform: Transform, skip_bad: bool = False) -> None:
        self.images = list(images)
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        image = self.images[index]
        try:
            loaded = load_image(image.read() if isinstance(image, ShardMember) else image)
        except BadSample as bad:
            if self.skip_bad:
                return index, bad.reason
            raise UserError(f"cannot read image {_describe(image)}: {bad} (--skip-bad drops it)") from None
        return index, self.transform(loaded)


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
    paths: Sequence[ImageRef],
    transform: Transform,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
) -> torch.Tensor:
    """`model.encode_image` of each image after `transform`: [len(paths), D] float32 on the CPU."""
    return encode_image_set(model, paths, transform, device, precision, batch_size, num_workers)[0]


def encode_image_set(
    model: torch.nn.Module,
    images: Sequence[ImageRef],
    transform: Transform,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
    skip_bad: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """(features of the readable images [N_ok, D] float32 on the CPU, (index, skip reason) of the unreadable ones).

    Without `skip_bad` the first unreadable image raises a UserError naming it, so the list is always empty.
    """
    loader = data_loader(ImageFiles(images, transform, skip_bad), workers=num_workers, batch_size=batch_size,
                         collate_fn=_collate_images)
    features, bad = [], []
    with inference(model, device, precision):
        for batch, unreadable in _progress(loader_batches(loader, "the data loader's timeout"), "images", progress,
                                           len(loader)):
            bad.extend(unreadable)
            if len(batch):
                features.append(_cpu(model.encode_image(batch.to(device, non_blocking=True))))
    if not features:
        raise UserError(f"no readable image among {len(images)}, e.g. {_describe(images[0])}")
    return torch.cat(features), bad


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """`model.encode_text` of the tokenised texts, `batch_size` at a time: [len(texts), D] float32 on the CPU."""
    texts = list(texts)
    starts = _progress(range(0, len(texts), batch_size), "texts", progress)
    with inference(model, device, precision):
        return torch.cat([_cpu(model.encode_text(tokenizer(texts[start : start + batch_size]).to(device)))
                          for start in starts])


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _cpu(features: torch.Tensor) -> torch.Tensor:
    return features.float().cpu()


def _collate_images(items: list[tuple[int, torch.Tensor | str]]) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    tensors = [item for _, item in items if isinstance(item, torch.Tensor)]
    bad = [(index, item) for index, item in items if isinstance(item, str)]
    return (torch.stack(tensors) if tensors else torch.empty(0)), bad


def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None) -> Iterable:
    """A tqdm bar on a terminal when `enabled`, else the iterable itself."""
    return tqdm(iterable, desc=desc, unit="batch", disable=None, leave=False, total=total) if enabled else iterable


def _describe(image: ImageRef) -> str:
    return f"{image.shard} at byte {image.offset}" if isinstance(image, ShardMember) else str(image)
