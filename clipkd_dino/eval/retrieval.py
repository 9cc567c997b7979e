"""Image-text retrieval: Recall@K under the two protocols, and the reader of retrieval files.

Protocols (named exactly so in every output):
- ``any_caption`` (Karpathy style, COCO 5k / Flickr30k 1k): every caption of every image is in the gallery; an image
  query is correct at K when ANY of its captions is in its top K, a caption query when its image is in its top K.
- ``one_to_one`` (CC3M-val style): the first caption of each image only, N images / N captions, ground truth = same
  index. The public CLIP-KD code keeps only the first caption per image, so its COCO numbers are ``one_to_one``.

Tie rule (pessimistic): ties are broken against the correct items. The rank of a query is the number of WRONG
gallery items whose score is >= the best score of its correct items; the query is correct at K when that rank < K.
So a constant similarity matrix gives R@K = 0 (whenever a query has at least K wrong items), never 100 %.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipkd_dino.errors import UserError

ANY_CAPTION = "any_caption"
ONE_TO_ONE = "one_to_one"
PROTOCOLS = {
    ANY_CAPTION: "Karpathy style: all captions of each image; an image query is correct at K when any of its "
    "captions is in its top K, a caption query when its image is in its top K",
    ONE_TO_ONE: "first caption of each image only (N images, N captions, ground truth = same index); the public "
    "CLIP-KD code keeps only the first caption, so its COCO numbers use this protocol",
}
DEFAULT_CHUNK = 256

Features = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class RetrievalSet:
    """A retrieval file, read: image paths (absolute), all captions, and caption j's image index."""

    path: Path
    images: list[Path]
    captions: list[str]
    text_to_image: list[int]


def retrieval_metrics(
    image_features: Features,
    text_features: Features,
    text_to_image: Sequence[int] | torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """I2T and T2I Recall@K in percent (keys ``i2t_R@K``, ``t2i_R@K``).

    image_features [N_img, D], text_features [N_txt, D] (normalised here), text_to_image [N_txt] with values in
    [0, N_img); every image needs at least one caption. Scores are computed `chunk_size` queries at a time, so memory
    is O(chunk_size * max(N_img, N_txt)). Runs on the device of `image_features`.
    """
    images = _normalised(image_features)
    texts = _normalised(text_features).to(images.device)
    if not isinstance(text_to_image, torch.Tensor):
        text_to_image = torch.as_tensor(np.asarray(text_to_image))
    owner = text_to_image.to(images.device, torch.long)
    _check_inputs(images, texts, owner, ks, chunk_size)
    image_ids = torch.arange(len(images), device=images.device)
    i2t = _ranks(images, texts, lambda rows: image_ids[rows, None] == owner[None, :], chunk_size)
    t2i = _ranks(texts, images, lambda rows: owner[rows, None] == image_ids[None, :], chunk_size)
    metrics = {f"i2t_R@{k}": _recall(i2t, k) for k in ks}
    metrics.update({f"t2i_R@{k}": _recall(t2i, k) for k in ks})
    return metrics


def protocol_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """Both protocols from the features of all captions: {"any_caption": {...}, "one_to_one": {...}}.

    image_features [N_img, D], text_features [N_txt, D]; one_to_one keeps the first caption of each image.
    """
    first = first_captions(text_to_image, len(image_features))
    return {
        ANY_CAPTION: retrieval_metrics(image_features, text_features, text_to_image, ks),
        ONE_TO_ONE: retrieval_metrics(image_features, text_features[first], range(len(first)), ks),
    }


def first_captions(text_to_image: Sequence[int], num_images: int) -> list[int]:
    """Index (into the captions) of the first caption of each image; ValueError when an image has none."""
    first: dict[int, int] = {}
    for caption, image in enumerate(text_to_image):
        first.setdefault(int(image), caption)
    missing = [image for image in range(num_images) if image not in first]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no caption, e.g. image {missing[0]}")
    return [first[image] for image in range(num_images)]


def read_retrieval_file(path: str | Path) -> RetrievalSet:
    """Read a JSONL file, one image per line: {"image": relative/path.png, "captions": [str, ...], ...}.

    Image paths are relative to the file. Raises a one-line UserError naming the file (and line) on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"retrieval file not found: {path}")
    images: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            image, image_captions = _parse_line(line, f"{path}:{number}", path.parent)
            owner.extend([len(images)] * len(image_captions))
            images.append(image)
            captions.extend(image_captions)
    if not images:
        raise UserError(f"{path}: no images (the file is empty)")
    return RetrievalSet(path, images, captions, owner)


def _parse_line(line: str, where: str, root: Path) -> tuple[Path, list[str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    for key in ("image", "captions"):
        if key not in record:
            raise UserError(f"{where}: missing key {key!r}")
    image, captions = record["image"], record["captions"]
    if not isinstance(image, str):
        raise UserError(f"{where}: 'image' must be a string")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise UserError(f"{where}: 'captions' must be a non-empty list of strings")
    image_path = root / image
    if not image_path.is_file():
        raise UserError(f"{where}: image file not found: {image_path}")
    return image_path, captions


def _normalised(features: Features) -> torch.Tensor:
    return F.normalize(torch.as_tensor(features).float(), dim=-1)


def _check_inputs(
    images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor, ks: Sequence[int], chunk_size: int
) -> None:
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(images.shape)} and {tuple(texts.shape)}")
    if not len(images):
        raise ValueError("need at least one image")
    if owner.shape != (len(texts),):
        raise ValueError(f"text_to_image has shape {tuple(owner.shape)}, expected ({len(texts)},)")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(images)):
        raise ValueError(f"text_to_image values must lie in [0, {len(images)})")
    captionless = torch.bincount(owner, minlength=len(images)) == 0
    if captionless.any():
        first = int(captionless.nonzero()[0])
        raise ValueError(f"{int(captionless.sum())} image(s) have no caption, e.g. image {first}")
    if not ks or any(int(k) < 1 for k in ks) or chunk_size < 1:
        raise ValueError(f"ks must be positive integers and chunk_size >= 1, got ks={tuple(ks)}, chunk={chunk_size}")


def _ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    correct: Callable[[slice], torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """Per query, the number of wrong gallery items scoring >= its best correct item. Shape [N_queries].

    `correct(rows)` gives the boolean mask [len(rows), N_gallery] of correct items for those query rows.
    """
    ranks = []
    for start in range(0, len(queries), chunk_size):
        rows = slice(start, start + chunk_size)
        scores = queries[rows] @ gallery.T
        mask = correct(rows)
        best = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((scores >= best) & ~mask).sum(dim=1))
    return torch.cat(ranks)


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * int((ranks < k).sum()) / len(ranks)
