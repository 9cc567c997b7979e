"""Top-k inner-product search in bounded memory: chunked torch (CPU or CUDA) or faiss (`IndexFlatIP`, CPU).

Neither backend ever holds the full queries x gallery score matrix: torch scores `query_chunk x gallery_chunk`
blocks and keeps a running top-k per query; faiss searches `query_chunk` queries at a time against a flat index
(exact inner products, its own blocked BLAS). Both return the same items except where scores tie at the k-th
place, which callers must tolerate (retrieval ranks do: see `retrieval.py`).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from tqdm import tqdm

from clipkd_dino.errors import UserError

BACKENDS = ("auto", "torch", "faiss")
QUERY_CHUNK = 1024
GALLERY_CHUNK = 65536


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' = faiss on the CPU when installed, else torch; 'faiss' without the module is a UserError."""
    if name not in BACKENDS:
        raise UserError(f"search backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "faiss" if device.type == "cpu" and faiss_available() else "torch"
    if name == "faiss" and not faiss_available():
        raise UserError("search backend 'faiss': the faiss module is not installed (pip install faiss-cpu)")
    return name


def top_k(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    backend: str = "torch",
    query_chunk: int = QUERY_CHUNK,
    gallery_chunk: int = GALLERY_CHUNK,
    progress: bool = False,
    desc: str = "search",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query the min(k, len(gallery)) items of highest inner product, best first.

    queries [Q >= 1, D], gallery [G, D] (any float dtype; scored in float32). Returns (scores [Q, k] float32, ids [Q, k]
    int64) on the device of `queries` (the CPU for faiss).
    """
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {query_chunk} and {gallery_chunk}")
    k = min(k, len(gallery))
    starts = range(0, len(queries), query_chunk)
    bar = tqdm(starts, desc=desc, unit="chunk", disable=None if progress else True, leave=False)
    if resolve_backend(backend, queries.device) == "faiss":
        return _faiss_top_k(queries, gallery, k, query_chunk, bar)
    results = [_torch_chunk(queries[start:start + query_chunk].float(), gallery, k, gallery_chunk) for start in bar]
    return torch.cat([s for s, _ in results]), torch.cat([i for _, i in results])


def _torch_chunk(queries: torch.Tensor, gallery: torch.Tensor, k: int, gallery_chunk: int):
    scores = queries.new_empty(len(queries), 0)
    ids = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    for start in range(0, len(gallery), gallery_chunk):
        block = queries @ gallery[start:start + gallery_chunk].to(queries.device, torch.float32).T
        block_scores, block_ids = block.topk(min(k, block.shape[1]), dim=1)
        scores, order = torch.cat([scores, block_scores], dim=1).topk(min(k, scores.shape[1] + block.shape[1]), dim=1)
        ids = torch.cat([ids, block_ids + start], dim=1).gather(1, order)
    return scores, ids


def _faiss_top_k(queries: torch.Tensor, gallery: torch.Tensor, k: int, query_chunk: int, bar):
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 1  # else small query batches take a slow non-BLAS path
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(_float32_numpy(gallery))
    results = [index.search(_float32_numpy(queries[start:start + query_chunk]), k) for start in bar]
    scores, ids = np.concatenate([s for s, _ in results]), np.concatenate([i for _, i in results])
    return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))


def _float32_numpy(features: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())
