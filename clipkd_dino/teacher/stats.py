"""`clipkd label stats`: what the pseudo-labels look like, and how right they are where ground truth is known.

Ground truth (toyworld's metadata: the kinds of a sample's objects) counts a label as right when it names the kind
of a single-object image, or one of the kinds of a multi-object image. The precision-vs-coverage curve ranks images
by margin (the nearest concept's lead over the runner-up): keeping the top fraction f of images is the margin
threshold at which coverage is f, so users can pick `--min-margin` by looking.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipkd_dino.files import write_json_atomic
from clipkd_dino.teacher.labels import Labels, load_labels

COVERAGES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _distribution(values: torch.Tensor) -> dict[str, float]:
    if not len(values):
        return {}
    q = torch.quantile(values.float(), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))
    return {"mean": round(float(values.mean()), 4), "min": round(float(q[0]), 4), "p10": round(float(q[1]), 4),
            "median": round(float(q[2]), 4), "p90": round(float(q[3]), 4), "max": round(float(q[4]), 4)}


def correctness(labels: Labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(known [N] bool: has ground truth, right [N] bool: the nearest concept names an object, single [N] bool)."""
    kinds = [set(filter(None, truth.lower().split(","))) for truth in labels.truth]
    known = torch.tensor([bool(k) for k in kinds])
    right = torch.tensor([name.lower() in k for name, k in zip(labels.nearest, kinds)])
    single = torch.tensor([len(truth.split(",")) == 1 and bool(truth) for truth in labels.truth])
    return known, right, single


def precision_coverage(margins: torch.Tensor, right: torch.Tensor) -> list[dict[str, float]]:
    """Precision of the nearest concept among the images of highest margin, at each coverage of COVERAGES."""
    order = torch.argsort(margins, descending=True, stable=True)
    hits = torch.cumsum(right[order].float(), 0)
    points = []
    for coverage in COVERAGES:
        n = max(1, round(coverage * len(order)))
        points.append({"coverage": coverage, "min_margin": round(float(margins[order[n - 1]]), 4),
                       "precision": round(100.0 * float(hits[n - 1]) / n, 2), "images": n})
    return points


def label_stats(directory: str | Path) -> dict:
    """Statistics of a labelling output folder; also written to DIR/stats.json."""
    labels = load_labels(directory)
    labelled = labels.labels >= 0
    counts = labels.counts.tolist()
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    stats: dict = {
        "samples": len(labels), "labelled": int(labelled.sum()), "classes": len(labels.concepts),
        "coverage": round(100.0 * float(labelled.float().mean()), 2) if len(labels) else 0.0,
        "histogram": {labels.concepts[c]: counts[c] for c in order},
        "most": [[labels.concepts[c], counts[c]] for c in order[:10]],
        "fewest": [[labels.concepts[c], counts[c]] for c in order[::-1][:10]],
        "score": _distribution(labels.scores), "margin": _distribution(labels.margins),
    }
    known, right, single = correctness(labels)
    if known.any():
        def precision(mask: torch.Tensor) -> float | None:
            return round(100.0 * float(right[mask].float().mean()), 2) if mask.any() else None

        stats["ground_truth"] = {
            "images": int(known.sum()),
            "precision_labelled": precision(known & labelled),
            "precision_labelled_single_object": precision(known & labelled & single),
            "precision_labelled_multi_object": precision(known & labelled & ~single),
            "precision_nearest_all": precision(known),
            "precision_nearest_single_object": precision(known & single),
            "precision_nearest_multi_object": precision(known & ~single),
            "precision_vs_coverage": precision_coverage(labels.margins[known], right[known]),
        }
    write_json_atomic(Path(directory) / "stats.json", stats)
    return stats


def format_stats(stats: dict) -> str:
    lines = [f"{stats['samples']} images, {stats['labelled']} labelled ({stats['coverage']:.1f}%) "
             f"into {stats['classes']} classes"]
    for name in ("score", "margin"):
        d = stats[name]
        if d:
            lines.append(f"{name:<7} mean {d['mean']:.3f}  min {d['min']:.3f}  p10 {d['p10']:.3f}  "
                         f"median {d['median']:.3f}  p90 {d['p90']:.3f}  max {d['max']:.3f}")
    lines.append("most images:   " + ", ".join(f"{n} {c}" for n, c in stats["most"]))
    lines.append("fewest images: " + ", ".join(f"{n} {c}" for n, c in stats["fewest"]))
    truth = stats.get("ground_truth")
    if truth:
        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f}%"

        lines.append(f"against ground truth ({truth['images']} images): labels right {pct(truth['precision_labelled'])}"
                     f" (single-object {pct(truth['precision_labelled_single_object'])}, multi-object "
                     f"{pct(truth['precision_labelled_multi_object'])})")
        lines.append("  keep the top fraction by margin -> precision of the nearest concept:")
        for point in truth["precision_vs_coverage"]:
            lines.append(f"    coverage {100 * point['coverage']:5.1f}%  (--min-margin {point['min_margin']:.4f})"
                         f"  precision {point['precision']:.1f}%")
    return "\n".join(lines)


def plot_stats(directory: str | Path, path: Path) -> Path:
    """A PNG: images per class, score and margin histograms, and precision vs coverage when ground truth exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipkd_dino.files import write_atomic

    labels = load_labels(directory)
    known, right, _ = correctness(labels)
    panels = 4 if known.any() else 3
    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.8))
    order = torch.argsort(labels.counts, descending=True)
    shown = order[:40]
    axes[0].bar(range(len(shown)), labels.counts[shown].tolist())
    axes[0].set_xticks(range(len(shown)), [labels.concepts[i] for i in shown], rotation=90, fontsize=7)
    axes[0].set_title(f"images per class ({len(labels.concepts)} classes)")
    axes[1].hist(labels.scores.tolist(), bins=40)
    axes[1].set_title("score (cosine to the nearest concept)")
    axes[2].hist(labels.margins.tolist(), bins=40)
    axes[2].set_title("margin over the runner-up")
    if known.any():
        margins, hits = labels.margins[known], right[known]
        order = torch.argsort(margins, descending=True, stable=True)
        curve = torch.cumsum(hits[order].float(), 0) / torch.arange(1, len(order) + 1)
        axes[3].plot((torch.arange(1, len(order) + 1) / len(order)).tolist(), (100 * curve).tolist())
        axes[3].set_xlabel("coverage (images kept, highest margin first)")
        axes[3].set_ylabel("precision (%)")
        axes[3].set_title("pseudo-label precision vs coverage")
        axes[3].grid(alpha=0.3)
    figure.tight_layout()
    write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=110))
    plt.close(figure)
    return path
