"""One entry point for every evaluation: used by `clipkd eval` and by the trainer at epoch ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from clipkd_dino.data.faults import check_max_bad_fraction, enforce_bad_fraction
from clipkd_dino.data.samples import IMAGE_REASONS
from clipkd_dino.errors import UserError
from clipkd_dino.eval.cache import EmbeddingCache
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
from clipkd_dino.models.loading import weights_digest


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

    def images(self, images: Sequence, skip_bad: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
        """(features of the readable images, {index: skip reason} of the unreadable ones: a UserError unless
        `skip_bad`)."""

        def compute() -> dict[str, torch.Tensor]:
            features, bad = encode_image_set(self.model, images, self.transform, self.device, self.precision,
                                             self.batch_size, self.num_workers, skip_bad, self.progress)
            return {"features": features, "bad": torch.tensor([index for index, _ in bad], dtype=torch.long),
                    "bad_reason": torch.tensor([IMAGE_REASONS.index(reason) for _, reason in bad], dtype=torch.long)}

        def key() -> dict[str, str]:
            return {"kind": "images", "weights": self.weights, "model": self.model_name,
                    "data": files_digest(images),
                    "preprocess": repr(self.transform), "precision": self.precision,
                    "skip_reasons": "1"}  # entries written before skip reasons were stored lack "bad_reason"

        entry = self.cache.get(key, compute)
        bad = {index: IMAGE_REASONS[code] for index, code in zip(entry["bad"].tolist(), entry["bad_reason"].tolist())}
        if bad and not skip_bad:  # cached by an earlier --skip-bad run
            first = next(iter(bad))
            raise UserError(f"cannot read image {images[first]} ({len(bad)} unreadable; --skip-bad drops them)")
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
    max_bad_fraction: float | None = None,
) -> dict:
    """Retrieval (both protocols) and/or zero-shot metrics of `model`, only the parts requested.

    `retrieval` is a retrieval JSONL file or any `RetrievalSet` (see `sources.py`), `zeroshot` a zero-shot directory
    or any `ZeroShotSet`; pass the read sets to avoid re-reading them at every call. `device` defaults to the
    model's. `cache` is an embedding-cache folder (None: no cache; `model_name` then tells tokenizers apart),
    `search` the retrieval backend (torch, faiss, auto), `skip_bad` drops unreadable images (and their captions);
    with `max_bad_fraction`, a data set of which more than that fraction was skipped (by its readers or here) is a
    TooManyBadSamples error. Returns {"retrieval": {"file", "format", "digest", "any_caption": {...},
    "one_to_one": {...}, "num_images", "num_captions", "skipped_images", "skipped_captions", "skipped_files",
    "skipped"}, "zeroshot": {"dir", "digest", "top1", "top5", "mean_per_class_recall", "num_samples", "num_classes",
    "num_templates", "skipped_images", "skipped_files", "skipped"}}, counts after skipping, "skipped" the faults skipped per reason
    (docs/reliability.md), the digests those of the data actually scored.
    """
    check_max_bad_fraction(max_bad_fraction, "--max-bad-fraction")
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
        results["retrieval"] = _retrieval(encoder, retrieval, skip_bad, backend, max_bad_fraction)
    if zeroshot is not None:
        results["zeroshot"] = _zeroshot(encoder, zeroshot, skip_bad, max_bad_fraction)
    return results


def _judge(data: RetrievalSet | ZeroShotSet, where: Path, limit: float | None) -> None:
    """The max_bad_fraction stop over a whole data set: its skipped faults among them plus the images kept."""
    skipped = sum(data.problems.values())
    enforce_bad_fraction(data.problems, len(data.images) + skipped, limit, str(where), final=True)


def _retrieval(encoder: Encoder, data: RetrievalSet, skip_bad: bool, backend: str, limit: float | None) -> dict:
    images, bad = encoder.images(data.images, skip_bad)
    data = data.without(bad)
    _judge(data, data.path, limit)
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
        "skipped": dict(sorted(data.problems.items())),
    }


def _zeroshot(encoder: Encoder, data: ZeroShotSet, skip_bad: bool, limit: float | None) -> dict:
    classifier = classifier_from_features(encoder.texts(prompts(data.classnames, data.templates)), len(data.classnames))
    images, bad = encoder.images(data.images, skip_bad)
    data = data.without(bad)
    _judge(data, data.root, limit)
    return {
        "dir": str(data.root),
        "digest": content_digest(data.image_ids, data.labels, data.classnames, data.templates),
        **zeroshot_accuracy(images, data.labels, classifier),
        "num_classes": len(data.classnames),
        "num_templates": len(data.templates),
        "skipped_images": len(data.skipped),
        "skipped_files": list(data.skipped),
        "skipped": dict(sorted(data.problems.items())),
    }
