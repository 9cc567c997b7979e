"""One entry point for every evaluation: used by `clipkd eval` and by the trainer at epoch ends."""

from __future__ import annotations

from pathlib import Path

import torch

from clipkd_dino.eval.encode import Tokenizer, Transform, encode_images, encode_texts, model_device
from clipkd_dino.eval.retrieval import RetrievalSet, protocol_metrics, read_retrieval_file
from clipkd_dino.eval.zeroshot import ZeroShotSet, read_zeroshot_dir, zeroshot_accuracy, zeroshot_classifier


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    transform: Transform,
    retrieval: str | Path | RetrievalSet | None = None,
    zeroshot: str | Path | ZeroShotSet | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict:
    """Retrieval (both protocols) and/or zero-shot metrics of `model`, only the parts requested.

    `retrieval` is a retrieval JSONL file (or its `RetrievalSet`), `zeroshot` a zero-shot directory (or its
    `ZeroShotSet`); pass the read sets to avoid re-reading them at every call. `device` defaults to the model's.
    Both data sets are read before any encoding, so a bad file fails fast. Returns
    {"retrieval": {"file", "any_caption": {...}, "one_to_one": {...}, "num_images", "num_captions"},
     "zeroshot": {"dir", "top1", "top5", "num_samples", "num_classes"}}.
    """
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(retrieval, (str, Path)):
        retrieval = read_retrieval_file(retrieval)
    if isinstance(zeroshot, (str, Path)):
        zeroshot = read_zeroshot_dir(zeroshot)
    options = {"device": device, "precision": precision, "batch_size": batch_size}
    results = {}
    if retrieval is not None:
        results["retrieval"] = _retrieval(model, tokenizer, transform, retrieval, num_workers, **options)
    if zeroshot is not None:
        results["zeroshot"] = _zeroshot(model, tokenizer, transform, zeroshot, num_workers, **options)
    return results


def _retrieval(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    transform: Transform,
    data: RetrievalSet,
    num_workers: int,
    device: torch.device,
    precision: str,
    batch_size: int,
) -> dict:
    images = encode_images(model, data.images, transform, device, precision, batch_size, num_workers)
    texts = encode_texts(model, tokenizer, data.captions, device, precision, batch_size)
    return {
        "file": str(data.path),
        **protocol_metrics(images, texts, data.text_to_image),
        "num_images": len(data.images),
        "num_captions": len(data.captions),
    }


def _zeroshot(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    transform: Transform,
    data: ZeroShotSet,
    num_workers: int,
    device: torch.device,
    precision: str,
    batch_size: int,
) -> dict:
    classifier = zeroshot_classifier(model, tokenizer, data.classnames, data.templates, device, precision, batch_size)
    images = encode_images(model, data.images, transform, device, precision, batch_size, num_workers)
    accuracy = zeroshot_accuracy(images, data.labels, classifier)
    return {"dir": str(data.root), **accuracy, "num_classes": len(data.classnames)}
