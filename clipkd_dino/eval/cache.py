"""An on-disk cache of evaluation embeddings, so a second metric or protocol on the same model and data is free.

An entry is one safetensors file named by the sha256 of its key: the digest of the model's weights, the digest of
the data (image locations, sizes and modification times; or the texts themselves), the preprocessing (image
transform or tokenizer) and the precision. Changing any of them makes a new entry; nothing is ever pickled, and
entries are written atomically, so a killed run leaves no torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load, save

from clipkd_dino.files import write_atomic


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/clipkd/embeddings, else ~/.cache/clipkd/embeddings."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipkd" / "embeddings"


class EmbeddingCache:
    """Tensors computed once per key under `root`; `root=None` disables the cache (always compute)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def get(self, key: Callable[[], dict[str, Any]],
            compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors stored for `key()`, or `compute()`'s, stored for next time (`key` is only called when the
        cache is on: digests of large models and data sets are not free)."""
        if self.root is None:
            return compute()
        text = json.dumps(key(), sort_keys=True)
        path = self.root / f"{hashlib.sha256(text.encode()).hexdigest()}.safetensors"
        if path.is_file():
            return load(path.read_bytes())
        tensors = {name: tensor.contiguous() for name, tensor in compute().items()}
        data = save(tensors, metadata={"key": text})
        write_atomic(path, lambda stream: stream.write(data))
        return tensors
