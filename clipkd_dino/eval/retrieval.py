"""Image-text retrieval: Recall@K under the two protocols, and the reader of retrieval files.

Protocols (named exactly so in every output):
- ``any_caption`` (Karpathy style, COCO 5k / Flickr30k 1k): every caption of every image is in the gallery; an image
  query is correct at K when ANY of its captions is in its top K, a caption query when its image is in its top K.
- ``one_to_one`` (CC3M-val style): the first caption of each image only, N images / N captions, ground truth = same
  index. The public CLIP-KD code keeps only the first caption per image, so its COCO numbers are ``one_to_one``.

Tie rule (pessimistic): ties are broken against the correct items. The rank of a query is the number of WRONG
gallery items whose score is >= the best score of its correct items; the query is correct at K when that rank < K.
So a constant similarity matrix gives R@K = 0 (whenever a query has at least K wrong items), never 100 %.

Scale: the ranks come from a top-k search (`search.py`, chunked torch or faiss) of depth max(K) + the most correct
items any query has, never from the full score matrix. That depth decides every rank below max(K) exactly, ties
included: if the search cuts a tie, at least max(K) wrong items score >= the best correct one anyway.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipkd_dino.data.faults import decode_text
from clipkd_dino.errors import UserError
from clipkd_dino.eval.search import GALLERY_CHUNK, QUERY_CHUNK, top_k
from clipkd_dino.eval.skips import skip_or_raise

ANY_CAPTION = "any_caption"
ONE_TO_ONE = "one_to_one"
PROTOCOLS = {
    ANY_CAPTION: "Karpathy style: all captions of each image; an image query is correct at K when any of its "
    "captions is in its top K, a caption query when its image is in its top K",
    ONE_TO_ONE: "first caption of each image only (N images, N captions, ground truth = same index); the public "
    "CLIP-KD code keeps only the first caption, so its COCO numbers use this protocol",
}
DEFAULT_CHUNK = QUERY_CHUNK

Features = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class RetrievalSet:
    """A retrieval data set, read: images, all captions, and caption j's image index.

    `images` are what the encoder opens (file paths or shard members), `image_ids` their portable names (the path
    as written in the data file, or the sample key) that the data set's digest covers. `skipped` names the images
    dropped by `without` (unreadable ones under --skip-bad), `skipped_captions` counts their captions, `problems`
    counts every fault skipped, by reason (also those found while reading, which name no image).
    """

    path: Path
    images: list
    captions: list[str]
    text_to_image: list[int]
    image_ids: list[str]
    format: str = "jsonl"
    skipped: tuple[str, ...] = ()
    skipped_captions: int = 0
    problems: dict[str, int] = field(default_factory=dict)

    def without(self, drop: Mapping[int, str]) -> "RetrievalSet":
        """The set without the images at the indices of `drop` and their captions (recorded as skipped under the
        reason each index maps to)."""
        keep = [index for index in range(len(self.images)) if index not in drop]
        new_index = {old: new for new, old in enumerate(keep)}
        captions = [j for j, owner in enumerate(self.text_to_image) if owner in new_index]
        return replace(
            self,
            images=[self.images[i] for i in keep],
            image_ids=[self.image_ids[i] for i in keep],
            captions=[self.captions[j] for j in captions],
            text_to_image=[new_index[self.text_to_image[j]] for j in captions],
            skipped=self.skipped + tuple(self.image_ids[i] for i in sorted(drop)),
            skipped_captions=self.skipped_captions + len(self.captions) - len(captions),
            problems=dict(Counter(self.problems) + Counter(drop.values())),
        )


def retrieval_metrics(
    image_features: Features,
    text_features: Features,
    text_to_image: Sequence[int] | torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = DEFAULT_CHUNK,
    backend: str = "torch",
    gallery_chunk: int = GALLERY_CHUNK,
    progress: bool = False,
) -> dict[str, float]:
    """I2T and T2I Recall@K in percent (keys ``i2t_R@K``, ``t2i_R@K``).

    image_features [N_img, D], text_features [N_txt, D] (normalised here; float16/bfloat16 features stay in that
    precision, halving their memory, and are scored in float32), text_to_image [N_txt] with values in
    [0, N_img); every image needs at least one caption. The search (`backend` torch, faiss or auto) scores
    `chunk_size` queries against `gallery_chunk` gallery items at a time, so memory stays bounded whatever the
    sizes. torch runs on the device of `image_features`.
    """
    images = _normalised(image_features)
    texts = _normalised(text_features).to(images.device)
    if not isinstance(text_to_image, torch.Tensor):
        text_to_image = torch.as_tensor(np.asarray(text_to_image))
    owner = text_to_image.to(images.device, torch.long)
    _check_inputs(images, texts, owner, ks, chunk_size)
    search = {"backend": backend, "query_chunk": chunk_size, "gallery_chunk": gallery_chunk, "progress": progress}
    max_k = max(int(k) for k in ks)
    captions_per_image = int(torch.bincount(owner).max())
    i2t_scores, i2t_ids = top_k(images, texts, max_k + captions_per_image, desc="i2t", **search)
    image_ids = torch.arange(len(images), device=i2t_ids.device)
    i2t = _ranks(i2t_scores, owner.to(i2t_ids.device)[i2t_ids] == image_ids[:, None], max_k)
    t2i_scores, t2i_ids = top_k(texts, images, max_k + 1, desc="t2i", **search)
    t2i = _ranks(t2i_scores, t2i_ids == owner.to(t2i_ids.device)[:, None], max_k)
    metrics = {f"i2t_R@{k}": _recall(i2t, k) for k in ks}
    metrics.update({f"t2i_R@{k}": _recall(t2i, k) for k in ks})
    return metrics


def protocol_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    **search,
) -> dict[str, dict[str, float]]:
    """Both protocols from the features of all captions: {"any_caption": {...}, "one_to_one": {...}}.

    image_features [N_img, D], text_features [N_txt, D]; one_to_one keeps the first caption of each image.
    `search` goes to `retrieval_metrics` (backend, chunk sizes, progress).
    """
    first = first_captions(text_to_image, len(image_features))
    return {
        ANY_CAPTION: retrieval_metrics(image_features, text_features, text_to_image, ks, **search),
        ONE_TO_ONE: retrieval_metrics(image_features, text_features[first], range(len(first)), ks, **search),
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


def read_retrieval_file(path: str | Path, check_images: bool = True, skip_bad: bool = False) -> RetrievalSet:
    """Read a JSONL file, one image per line: {"image": relative/path.png, "captions": [str, ...], ...}.

    Image paths are relative to the file. Raises a one-line UserError naming the file (and line) on any problem,
    a missing image file included unless `check_images` is False (then the encoder meets it). With `skip_bad` a
    line that is not UTF-8 (`invalid_utf8`) or has an empty caption list (`missing_caption`) is skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"retrieval file not found: {path}")
    names: list[str] = []
    captions: list[str] = []
    owner: list[int] = []
    problems: Counter = Counter()
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            line = decode_text(raw)
            if line is None:
                skip_or_raise(problems, "invalid_utf8", f"{where}: not UTF-8", skip_bad)
                continue
            if not line.strip():
                continue
            name, image_captions = _parse_line(line, where, path.parent, check_images)
            if not image_captions:
                skip_or_raise(problems, "missing_caption", f"{where}: 'captions' must be a non-empty list of strings",
                              skip_bad)
                continue
            owner.extend([len(names)] * len(image_captions))
            names.append(name)
            captions.extend(image_captions)
    if not names:
        raise UserError(f"{path}: no images (the file is empty)")
    return RetrievalSet(path, [path.parent / name for name in names], captions, owner, names,
                        problems=dict(problems))


def _parse_line(line: str, where: str, root: Path, check_image: bool) -> tuple[str, list[str]]:
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
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise UserError(f"{where}: 'captions' must be a non-empty list of strings")
    if check_image and not (root / image).is_file():
        raise UserError(f"{where}: image file not found: {root / image}")
    return image, captions


def _normalised(features: Features) -> torch.Tensor:
    """Unit rows, float32, or kept in half precision (normalised in float32 blocks, never a full float32 copy)."""
    features = torch.as_tensor(features)
    dtype = features.dtype if features.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.cat([F.normalize(block.float(), dim=-1).to(dtype) for block in features.split(GALLERY_CHUNK)])


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


def _ranks(scores: torch.Tensor, correct: torch.Tensor, max_k: int) -> torch.Tensor:
    """Per query, the number of wrong items scoring >= its best correct item, capped at `max_k`. Shape [N_queries].

    scores [Q, depth] are a query's top items, best first, `correct` [Q, depth] marks its correct ones; a query whose
    correct items all lie below the top list gets `max_k`.
    """
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    ranks = ((scores >= best) & ~correct).sum(dim=1)
    return torch.where(correct.any(dim=1), ranks.clamp(max=max_k), max_k)


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * int((ranks < k).sum()) / len(ranks)
