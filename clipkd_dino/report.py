"""Readable text summaries of runs and metrics."""

from __future__ import annotations

import json
import math
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


# ----------------------------------------------------------------------------------------------------- paired
def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1, exactly (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, total, term = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2 == 0:
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 1) // 2):
        term *= 2 * k / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile t_{p, df} for 0.5 <= p < 1: the root of the exact CDF above, by bisection."""
    target, low, high = 2 * p - 1, 0.0, 1.0
    while t_two_sided(high, df) < target:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided(middle, df) < target else (low, middle)
    return (low + high) / 2


def paired_difference(treated: list[float], control: list[float], level: float = 0.95) -> dict[str, Any]:
    """Per-pair differences treated - control (pair i: same seed), their mean, sd and the t-interval
    mean ± t_{(1+level)/2, n-1} sd / sqrt(n); "low"/"high" are None below 2 pairs."""
    if len(treated) != len(control) or not treated:
        raise ValueError(f"paired values need equal, non-zero counts (got {len(treated)} and {len(control)})")
    diffs = [a - b for a, b in zip(treated, control)]
    n, mean = len(diffs), statistics.mean(diffs)
    result: dict[str, Any] = {"n": n, "diffs": diffs, "mean": mean, "sd": None, "low": None, "high": None}
    if n > 1:
        sd = statistics.stdev(diffs)
        half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
        result |= {"sd": sd, "low": mean - half, "high": mean + half}
    return result


def interval_verdict(paired: dict[str, Any]) -> str:
    """In words: whether the paired 95% interval excludes 0 (and on which side)."""
    if paired["low"] is None:
        return "needs ≥ 2 seeds"
    if paired["low"] > 0:
        return "excludes 0 (higher)"
    if paired["high"] < 0:
        return "excludes 0 (lower)"
    return "includes 0"


def paired_table(rows: dict[str, tuple[list[float], list[float]]], treated: str, control: str) -> str:
    """Markdown: per metric, treated and control mean ± sd, the paired difference treated - control with its 95%
    t-interval, the per-seed differences and whether the interval excludes 0. rows: metric -> (treated, control),
    each ordered by seed."""
    lines = [f"| metric | {treated} | {control} | paired diff, mean | 95% interval | per seed | interval |",
             "|---|---|---|---|---|---|---|"]
    for metric, (a, b) in rows.items():
        paired = paired_difference(a, b)
        interval = "" if paired["low"] is None else f"[{paired['low']:+.2f}, {paired['high']:+.2f}]"
        seeds = ", ".join(f"{d:+.2f}" for d in paired["diffs"])
        lines.append(f"| {metric} | {mean_sd(a)} | {mean_sd(b)} | {paired['mean']:+.2f} | {interval} | {seeds} | "
                     f"{interval_verdict(paired)} |")
    return "\n".join(lines)


def paired_summary(rows: dict[str, tuple[list[float], list[float]]]) -> dict[str, dict[str, Any]]:
    """metric -> `paired_difference` of its (treated, control) values (for summary files)."""
    summary = {metric: paired_difference(a, b) for metric, (a, b) in rows.items()}
    return {metric: paired | {"verdict": interval_verdict(paired)} for metric, paired in summary.items()}


def paired_words(rows: dict[str, tuple[list[float], list[float]]]) -> str:
    """One sentence: which metrics' paired 95% intervals exclude 0."""
    seeds = len(next(iter(rows.values()))[0]) if rows else 0
    if seeds < 2:
        return (f"{seeds} seed: a paired interval needs at least 2 seeds (`--seeds N`); a one-seed difference is "
                "no evidence either way.")
    verdicts = {metric: interval_verdict(paired) for metric, paired in paired_summary(rows).items()}
    excluded = [f"{metric} {verdict.removeprefix('excludes 0 ')}" for metric, verdict in verdicts.items()
                if verdict.startswith("excludes")]
    if not excluded:
        return f"Over {seeds} paired seeds every 95% interval includes 0: no difference shown."
    return (f"Over {seeds} paired seeds the 95% interval excludes 0 for {', '.join(excluded)}; the others include 0 "
            "(no difference shown).")


def plot_loss_curves(runs: dict[str, Path], out: Path) -> Path:
    """One panel per logged loss term (`loss`, `loss_*` in each run's `log.jsonl`) against the step, a line per
    run; `runs` maps a label to the run's `log.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {label: read_jsonl(path) for label, path in runs.items()}
    terms = sorted({k for records in logs.values() for r in records for k in r if k.startswith("loss")},
                   key=lambda k: (k != "loss", k))
    columns = min(3, len(terms))
    rows = math.ceil(len(terms) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, term in zip(axes.flat, terms):
        for index, (label, records) in enumerate(logs.items()):
            points = [(r["step"], r[term]) for r in records if term in r]
            if points:
                axis.plot(*zip(*points), color=f"C{index}", alpha=0.8, label=label)
        axis.set_title(term + (" (total)" if term == "loss" else " (weighted)"))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(terms):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
