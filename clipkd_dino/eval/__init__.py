"""Evaluation: image-text retrieval Recall@K (protocols "any_caption" and "one_to_one") and zero-shot accuracy, on
the public formats (Karpathy files, CSV / webdataset pairs, image folders), for any CLIP model, with an embedding cache.

The names below load lazily (PEP 562), so importing `clipkd_dino.eval.commands` for `clipkd --help` pulls in no torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EmbeddingCache": "cache",
    "encode_image_set": "encode",
    "encode_images": "encode",
    "encode_texts": "encode",
    "Encoder": "evaluate",
    "evaluate_model": "evaluate",
    "load_eval_model": "models",
    "markdown_table": "tables",
    "compare_reports": "tables",
    "ANY_CAPTION": "retrieval",
    "ONE_TO_ONE": "retrieval",
    "PROTOCOLS": "retrieval",
    "RetrievalSet": "retrieval",
    "protocol_metrics": "retrieval",
    "read_retrieval_file": "retrieval",
    "retrieval_metrics": "retrieval",
    "top_k": "search",
    "check_images": "sources",
    "read_karpathy": "sources",
    "read_pairs": "sources",
    "ZeroShotSet": "zeroshot",
    "read_image_folder": "zeroshot",
    "read_zeroshot": "zeroshot",
    "read_zeroshot_dir": "zeroshot",
    "zeroshot_accuracy": "zeroshot",
    "zeroshot_classifier": "zeroshot",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

