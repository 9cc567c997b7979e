"""The frozen teacher's pass over the training data: pseudo-labels, class means and an embedding cache.

The names below load their module on first use, so that importing a sibling (`clipkd_dino.teacher.commands`, which
`clipkd --help` needs) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"TeacherCache": "cache", "ClassMeans": "class_means", "load_class_means": "class_means",
          "Labels": "labels", "load_labels": "labels"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'clipkd_dino.teacher' has no attribute {name!r}")
    return getattr(importlib.import_module(f"clipkd_dino.teacher.{_HOMES[name]}"), name)
