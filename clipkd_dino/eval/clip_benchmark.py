"""Our evaluation report in LAION CLIP_benchmark's result layout, so that `clip_benchmark build *.json` tables take it.

CLIP_benchmark (1.6) writes one JSON per (dataset, model, task): {"dataset", "model", "pretrained", "task",
"metrics", "language"}, named `{dataset}_{pretrained}_{model}_{language}_{task}.json`. Its metrics are fractions in
[0, 1]: `zeroshot_retrieval` has `image_retrieval_recall@K` (a caption queries the images: our t2i) and
`text_retrieval_recall@K` (an image queries the captions, a hit when any of its captions is in the top K: our i2t
under the any_caption protocol); `zeroshot_classification` has `acc1`, `acc5` and `mean_per_class_recall`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from clipkd_dino.files import write_json_atomic

IMAGENET_CLASSES = 1000


def benchmark_results(report: dict[str, Any], retrieval_dataset: str | None,
                      zeroshot_dataset: str | None) -> list[dict[str, Any]]:
    """CLIP_benchmark's result dicts for the retrieval and zero-shot parts of a `clipkd eval` report."""
    common = {"model": report["model"], "pretrained": report.get("pretrained") or "", "language": "en"}
    results = []
    retrieval = report.get("retrieval", {}).get("any_caption")
    if retrieval and retrieval_dataset:
        metrics = {}
        for k in (1, 5, 10):
            metrics[f"image_retrieval_recall@{k}"] = retrieval[f"t2i_R@{k}"] / 100
            metrics[f"text_retrieval_recall@{k}"] = retrieval[f"i2t_R@{k}"] / 100
        results.append({"dataset": retrieval_dataset, "task": "zeroshot_retrieval", "metrics": metrics, **common})
    zeroshot = report.get("zeroshot")
    if zeroshot and zeroshot_dataset:
        metrics = {"acc1": zeroshot["top1"] / 100, "acc5": zeroshot["top5"] / 100,
                   "mean_per_class_recall": zeroshot["mean_per_class_recall"] / 100}
        results.append({"dataset": zeroshot_dataset, "task": "zeroshot_classification", "metrics": metrics,
                        **common})
    return [{key: result[key] for key in ("dataset", "model", "pretrained", "task", "metrics", "language")}
            for result in results]


def write_benchmark_results(results: list[dict[str, Any]], folder: str | Path) -> list[Path]:
    """Each result as `FOLDER/{dataset}_{pretrained}_{model}_{language}_{task}.json` (CLIP_benchmark's default
    name; of a file or folder path, its last part); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for result in results:
        parts = (result["dataset"], Path(result["pretrained"]).name, Path(result["model"]).name, result["language"],
                 result["task"])
        path = folder / ("_".join(_slug(part) for part in parts) + ".json")
        write_json_atomic(path, result)
        paths.append(path)
    return paths


def retrieval_dataset_name(karpathy: str | None, source: str | None) -> str | None:
    """CLIP_benchmark's name for a Karpathy split of COCO or Flickr (`mscoco_captions`, `flickr30k`, `flickr8k`),
    else the data file's or folder's name."""
    if karpathy:
        name = Path(karpathy).name.lower()
        for marker, dataset in (("coco", "mscoco_captions"), ("flickr30k", "flickr30k"), ("flickr8k", "flickr8k")):
            if marker in name:
                return dataset
        return Path(karpathy).stem
    return Path(source.rstrip("/")).stem if source else None


def zeroshot_dataset_name(folder: str | None, num_classes: int) -> str | None:
    """`imagenet1k` for ImageNet's 1000 classes, else the folder's name."""
    if not folder:
        return None
    return "imagenet1k" if num_classes == IMAGENET_CLASSES else Path(folder.rstrip("/")).name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.@+-]+", "_", text).strip("_") or "none"
