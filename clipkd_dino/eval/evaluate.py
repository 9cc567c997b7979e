"""One entry point for every evaluation: used by `clipkd eval` and by the trainer at epoch ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from clipkd_dino.errors import UserError
from clipkd_dino.eval.cache import EmbeddingCache, weights_digest
from clipkd_dino.eval.encode import Tokenizer, Transform, encode_image_set, encode_texts, model_device
from clipkd_dino.eval.retrieval import RetrievalSet, protocol_metrics, read_retrieval_file
from clipkd_dino.eval.search import resolve_backend
from clipkd_dino.eval.sources import content_digest, files_digest
from clipkd_dino.eval.zeroshot import (
    ZeroShotSet,
    classifier_from_features,
    prompts,
    read_zeroshot_dir,
    zeroshot_accuracy,
)


@dataclass
class Encoder:
    """The features of one model, computed at most once per (weights, data, preprocessing, precision) with a cache."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    transform: Transform
    device: torch.device
    precision: str = "fp32"
    batch_size: int = 256
    num_workers: int = 0
    cache: EmbeddingCache = field(default_factory=lambda: EmbeddingCache(None))
    model_name: str = ""
    progress: bool = False

    @cached_property
    def weights(self) -> str:
        return weights_digest(self.model)

    def images(self, images: Sequence, skip_bad: bool = False) -> tuple[torch.Tensor, list[int]]:
        """(features of the readable images, indices of the unreadable ones: a UserError unless `skip_bad`)."""

        def compute() -> dict[str, torch.Tensor]:
            features, bad = encode_image_set(self.model, images, self.transform, self.device, self.precision,
                                             self.batch_size, self.num_workers, skip_bad, self.progress)
            return {"features": features, "bad": torch.tensor(bad, dtype=torch.long)}

        def key() -> dict[str, str]:
            return {"kind": "images", "weights": self.weights, "data": files_digest(images),
                    "preprocess": repr(self.transform), "precision": self.precision}

        entry = self.cache.get(key, compute)
        bad = entry["bad"].tolist()
        if bad and not skip_bad:  # cached by an earlier --skip-bad run
            raise UserError(f"cannot read image {images[bad[0]]} ({len(bad)} unreadable; --skip-bad drops them)")
        return entry["features"], bad

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        def compute() -> dict[str, torch.Tensor]:
            return {"features": encode_texts(self.model, self.tokenizer, texts, self.device, self.precision,
                                             self.batch_size, self.progress)}

        def key() -> dict[str, str]:
            return {"kind": "texts", "weights": self.weights, "model": self.model_name,
                    "data": content_digest(list(texts)), "precision": self.precision}

        return self.cache.get(key, compute)["features"]


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
    cache: str | Path | None = None,
    model_name: str = "",
    search: str = "torch",
    skip_bad: bool = False,
    progress: bool = False,
) -> dict:
    """Retrieval (both protocols) and/or zero-shot metrics of `model`, only the parts requested.

    `retrieval` is a retrieval JSONL file or any `RetrievalSet` (see `sources.py`), `zeroshot` a zero-shot directory
    or any `ZeroShotSet`; pass the read sets to avoid re-reading them at every call. `device` defaults to the
    model's. `cache` is an embedding-cache folder (None: no cache; `model_name` then tells tokenizers apart),
    `search` the retrieval backend (torch, faiss, auto), `skip_bad` drops unreadable images (and their captions).
    Returns {"retrieval": {"file", "format", "digest", "any_caption": {...}, "one_to_one": {...}, "num_images",
    "num_captions", "skipped_images", "skipped_captions", "skipped_files"},
    "zeroshot": {"dir", "digest", "top1", "top5", "num_samples", "num_classes", "num_templates", "skipped_images",
    "skipped_files"}}, counts after skipping, the digests those of the data actually scored.
    """
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(retrieval, (str, Path)):
        retrieval = read_retrieval_file(retrieval)
    if isinstance(zeroshot, (str, Path)):
        zeroshot = read_zeroshot_dir(zeroshot)
    backend = resolve_backend(search, device)
    encoder = Encoder(model, tokenizer, transform, device, precision, batch_size, num_workers,
                      EmbeddingCache(cache), model_name, progress)
    results = {}
    if retrieval is not None:
        results["retrieval"] = _retrieval(encoder, retrieval, skip_bad, backend)
    if zeroshot is not None:
        results["zeroshot"] = _zeroshot(encoder, zeroshot, skip_bad)
    return results


def _retrieval(encoder: Encoder, data: RetrievalSet, skip_bad: bool, backend: str) -> dict:
    images, bad = encoder.images(data.images, skip_bad)
    data = data.without(bad)
    texts = encoder.texts(data.captions)
    if backend == "torch":
        images = images.to(encoder.device)
    metrics = protocol_metrics(images, texts, data.text_to_image, backend=backend, progress=encoder.progress)
    return {
        "file": str(data.path),
        "format": data.format,
        "digest": content_digest(data.image_ids, data.captions, data.text_to_image),
        **metrics,
        "num_images": len(data.images),
        "num_captions": len(data.captions),
        "skipped_images": len(data.skipped),
        "skipped_captions": data.skipped_captions,
        "skipped_files": list(data.skipped),
    }


def _zeroshot(encoder: Encoder, data: ZeroShotSet, skip_bad: bool) -> dict:
    classifier = classifier_from_features(encoder.texts(prompts(data.classnames, data.templates)), len(data.classnames))
    images, bad = encoder.images(data.images, skip_bad)
    data = data.without(bad)
    return {
        "dir": str(data.root),
        "digest": content_digest(data.image_ids, data.labels, data.classnames, data.templates),
        **zeroshot_accuracy(images, data.labels, classifier),
        "num_classes": len(data.classnames),
        "num_templates": len(data.templates),
        "skipped_images": len(data.skipped),
        "skipped_files": list(data.skipped),
    }
