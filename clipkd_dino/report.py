"""Readable text summaries of runs and metrics."""

from __future__ import annotations

from typing import Any


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
        lines.append(f"zero-shot on {zeroshot.get('num_samples')} images: top-1 {zeroshot['top1']:.2f}%  "
                     f"top-5 {zeroshot['top5']:.2f}%")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    skipped = summary.get("skipped_samples") or {}
    lines = [
        f"trained {summary['model']}: {summary['epochs']} epochs, {summary['steps']} steps, global batch "
        f"{summary['global_batch']} on {summary['processes']} process(es) in {summary['wall_seconds']:.0f} s",
        f"skipped samples: {sum(skipped.values())}" + (f" {skipped}" if skipped else ""),
        f"checkpoint: {summary['checkpoint']}",
    ]
    if summary.get("metrics"):
        lines.append(format_metrics(summary["metrics"]))
    return "\n".join(lines)
