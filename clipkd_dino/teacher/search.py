"""Nearest concept of each image: the best cosine, its concept, and the margin over the runner-up.

Two backends give the same labels: chunked torch matmul (any device) and faiss (an inner-product flat index; a GPU
index when faiss has GPUs). Scores within `TIE_TOLERANCE` of the best count as ties (the two backends sum in
different orders, so an exact tie can differ in the last bit) and go to the lower concept index in both. With a
single concept the runner-up cosine is taken as -1 (the lowest possible), so the margin is the score + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ("torch", "faiss")
TIE_TOLERANCE = 1e-6
FAISS_CANDIDATES = 8  # nearest concepts fetched by faiss, among which ties are resolved


@dataclass(frozen=True)
class Nearest:
    """concept [N] int64, score [N] and margin [N] float32 (cosines)."""

    concept: torch.Tensor
    score: torch.Tensor
    margin: torch.Tensor


def nearest_concepts(images: torch.Tensor, concepts: torch.Tensor, backend: str = "torch",
                     chunk_size: int = 4096) -> Nearest:
    """images [N, D], concepts [C, D], both L2-normalised -> the best concept of each image with score and margin."""
    if backend == "faiss":
        return _faiss_nearest(images, concepts)
    if backend != "torch":
        raise ValueError(f"unknown search backend {backend!r} (choose from {BACKENDS})")
    parts = [_torch_nearest(images[start:start + chunk_size], concepts)
             for start in range(0, len(images), chunk_size)]
    if not parts:
        empty = images.new_zeros(0)
        return Nearest(empty.long(), empty.float(), empty.float())
    return Nearest(*(torch.cat([getattr(p, name) for p in parts]) for name in ("concept", "score", "margin")))


def _torch_nearest(images: torch.Tensor, concepts: torch.Tensor) -> Nearest:
    return _pick(images.float() @ concepts.float().T, None)


def _pick(scores: torch.Tensor, ids: torch.Tensor | None) -> Nearest:
    """The lowest concept id among the (near-)best scores [N, K] (candidate ids [N, K], or column = id)."""
    ids = torch.arange(scores.shape[1], device=scores.device).expand_as(scores) if ids is None else ids
    tied = scores >= scores.amax(dim=1, keepdim=True) - TIE_TOLERANCE
    column = torch.where(tied, ids, torch.iinfo(torch.long).max).argmin(dim=1, keepdim=True)
    best, top = ids.gather(1, column)[:, 0], scores.gather(1, column)[:, 0]
    if scores.shape[1] == 1:
        return Nearest(best, top, top + 1.0)
    runner_up = scores.scatter(1, column, float("-inf")).amax(dim=1)
    return Nearest(best, top, top - runner_up)


def _faiss_nearest(images: torch.Tensor, concepts: torch.Tensor) -> Nearest:
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 1  # small query batches otherwise take a slow path
    vectors = concepts.detach().float().cpu().contiguous().numpy()
    index = faiss.IndexFlatIP(vectors.shape[1])
    if faiss.get_num_gpus() > 0 and images.device.type == "cuda":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    scores, ids = index.search(images.detach().float().cpu().contiguous().numpy(),
                               min(FAISS_CANDIDATES, len(vectors)))
    return _pick(torch.from_numpy(scores), torch.from_numpy(ids).long())


def assign_labels(nearest: Nearest, min_score: float | None = None, min_margin: float | None = None) -> torch.Tensor:
    """The concept of each image, or -1 where its score is below `min_score` or its margin below `min_margin`."""
    keep = torch.ones_like(nearest.concept, dtype=torch.bool)
    if min_score is not None:
        keep &= nearest.score >= min_score
    if min_margin is not None:
        keep &= nearest.margin >= min_margin
    return torch.where(keep, nearest.concept, torch.full_like(nearest.concept, -1))
