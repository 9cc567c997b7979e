"""Readable text summaries of runs and metrics."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def mean_sd(values: list[float]) -> str:
    """"12.34 ± 0.56" over the values (the sample standard deviation); just the value when there is one."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """Retrieval (both protocols) and zero-shot results as an aligned text table."""
    lines = []
    retrieval = metrics.get("retrieval")
    if retrieval:
        lines.append(f"retrieval on {retrieval.get('num_images')} images / {retrieval.get('num_captions')} captions"
                     " (Recall@K, %)")
        lines.append(f"  {'protocol':<12} {'i2t R@1':>8} {'i2t R@5':>8} {'i2t R@10':>9} "
                     f"{'t2i R@1':>8} {'t2i R@5':>8} {'t2i R@10':>9}")
        for protocol in ("any_caption", "one_to_one"):
            r = retrieval.get(protocol)
            if r:
                lines.append(f"  {protocol:<12} {r['i2t_R@1']:8.2f} {r['i2t_R@5']:8.2f} {r['i2t_R@10']:9.2f} "
                             f"{r['t2i_R@1']:8.2f} {r['t2i_R@5']:8.2f} {r['t2i_R@10']:9.2f}")
    zeroshot = metrics.get("zeroshot")
    if zeroshot:
        lines.append(f"zero-shot on {zeroshot.get('num_samples')} images: top1 {zeroshot['top1']:.2f}%  "
                     f"top5 {zeroshot['top5']:.2f}%")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    from clipkd_dino.data.faults import format_skipped

    lines = [
        f"trained {summary['model']}: {summary['epochs']} epochs, {summary['steps']} steps, global batch "
        f"{summary['global_batch']} on {summary['processes']} process(es) in {summary['wall_seconds']:.0f} s",
        f"data: {format_skipped(summary.get('skipped_samples') or {})} of {summary.get('seen_samples', 0)} "
        "samples read",
        f"checkpoint: {summary['checkpoint']}",
    ]
    if summary.get("metrics"):
        lines.append(format_metrics(summary["metrics"]))
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_eval_curves(runs: dict[str, Path], out: Path) -> Path:
    """One PNG with i2t R@1 (any_caption) and zero-shot top-1 against the epoch, a line per run.

    `runs` maps a label to the run's `metrics.jsonl`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, path in runs.items():
        records = read_jsonl(path)
        epochs = [r["epoch"] for r in records]
        left.plot(epochs, [r["retrieval"]["any_caption"]["i2t_R@1"] for r in records], marker="o", label=label)
        right.plot(epochs, [r["zeroshot"]["top1"] for r in records], marker="o", label=label)
    for axis, title in ((left, "i2t R@1, any_caption (%)"), (right, "zero-shot top-1 (%)")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
