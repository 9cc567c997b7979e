"""`clipkd label stats`: what the pseudo-labels look like, and how right they are where ground truth is known.

Ground truth (toyworld's metadata: the kinds of a sample's objects) counts a label as right when it names the kind
of a single-object image, or one of the kinds of a multi-object image. The precision-vs-coverage curve ranks images
by margin (the nearest concept's lead over the runner-up): keeping the top fraction f of images is the margin
threshold at which coverage is f, so users can pick `--min-margin` by looking.

Memory: the per-sample files are read CHUNK rows at a time (no Python object per sample beyond a chunk's truth
lines); what is kept whole is compact numpy: one float32 array for a distribution's quantiles, and the margins and
right/wrong flags of the images with ground truth (5 bytes an image) for the curve. See docs/benchmarks.md.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import numpy as np

from clipkd_dino.files import write_json_atomic
from clipkd_dino.teacher.labels import LABELS_DIR, SAMPLES_DIR, TRUTH_FILE, Labels, load_labels

COVERAGES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
CHUNK = 1 << 20  # rows read at a time
CURVE_BINS = 2048  # margin bins of the plotted precision-vs-coverage curve


def read_chunks(path: Path, rows: int = CHUNK) -> Iterator[np.ndarray]:
    """A 1-D .npy file, `rows` at a time, by plain reads (a memory map would keep every page read resident)."""
    header = np.load(path, mmap_mode="r")  # its shape, dtype and data offset; no page of data is read
    length, dtype, offset = len(header), header.dtype, header.offset
    del header
    with open(path, "rb") as stream:
        stream.seek(offset)
        for start in range(0, length, rows):
            yield np.fromfile(stream, dtype=dtype, count=min(rows, length - start))


def read_array(path: Path) -> np.ndarray:
    """A 1-D .npy file read into memory (not memory-mapped, as in `read_chunks`)."""
    with open(path, "rb") as stream:
        return np.lib.format.read_array(stream)


def _distribution(values: np.ndarray) -> dict[str, float]:
    """Mean (float64 sum) and the quantiles of QUANTILES, interpolated as torch.quantile does (float32 ranks and
    lerp); `values` is reordered in place."""
    if not len(values):
        return {}
    mean = float(values.sum(dtype=np.float64) / len(values))
    ranks = np.float32(QUANTILES) * np.float32(len(values) - 1)
    below = ranks.astype(np.int64)
    above = np.ceil(ranks).astype(np.int64)
    values.partition(np.unique(np.concatenate([below, above])))
    low, high, weight = values[below], values[above], ranks - below.astype(np.float32)
    q = np.where(weight < 0.5, low + weight * (high - low), high - (high - low) * (np.float32(1) - weight))
    return {"mean": round(mean, 4), "min": round(float(q[0]), 4), "p10": round(float(q[1]), 4),
            "median": round(float(q[2]), 4), "p90": round(float(q[3]), 4), "max": round(float(q[4]), 4)}


class Truth:
    """Ground truth against the nearest concepts, by chunks of rows. Work is per distinct truth string (a dict of
    them), not per row: a row is its string's id."""

    def __init__(self, labels: Labels) -> None:
        names = labels.provenance["concepts_searched"]
        self.directory, self.num_concepts = labels.directory, len(names)
        self.by_name: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            self.by_name.setdefault(name.lower(), []).append(index)
        self.ids: dict[str, int] = {}
        self.known: list[bool] = []
        self.single: list[bool] = []
        self.pairs: list[int] = []  # id * C + concept, for every concept a truth string names

    def _id(self, truth: str) -> int:
        number = self.ids.get(truth)
        if number is None:
            number = self.ids[truth] = len(self.ids)
            kinds = set(filter(None, truth.lower().split(",")))
            self.known.append(bool(kinds))
            self.single.append(len(truth.split(",")) == 1 and bool(truth))
            self.pairs += [number * self.num_concepts + c for kind in kinds for c in self.by_name.get(kind, [])]
        return number

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(known: has ground truth, right: the nearest concept names an object, single: one object) bool arrays,
        CHUNK rows at a time; nothing when the output has no truth.txt."""
        path = self.directory / SAMPLES_DIR / TRUTH_FILE
        if not path.is_file():
            return
        with open(path, encoding="utf-8", errors="surrogateescape") as lines:
            for concept in read_chunks(self.directory / LABELS_DIR / "concept.npy"):
                ids = np.fromiter((self._id(line[:-1]) for line in itertools.islice(lines, len(concept))),
                                  dtype=np.int64, count=len(concept))
                keys, pairs = ids * self.num_concepts + concept, np.sort(np.asarray(self.pairs, dtype=np.int64))
                right = pairs[np.searchsorted(pairs, keys).clip(max=len(pairs) - 1)] == keys if len(pairs) \
                    else np.zeros(len(keys), dtype=bool)
                yield np.asarray(self.known)[ids], right, np.asarray(self.single)[ids]


# precision_* of stats.json -> the images with ground truth it counts, from (labelled, single)
GROUPS = {
    "precision_labelled": lambda labelled, single: labelled,
    "precision_labelled_single_object": lambda labelled, single: labelled & single,
    "precision_labelled_multi_object": lambda labelled, single: labelled & ~single,
    "precision_nearest_all": lambda labelled, single: np.ones_like(single),
    "precision_nearest_single_object": lambda labelled, single: single,
    "precision_nearest_multi_object": lambda labelled, single: ~single,
}


def ground_truth(labels: Labels) -> tuple[dict[str, tuple[int, int]], np.ndarray, np.ndarray]:
    """({group of GROUPS: (images, right)}, margins float32 [K], right bool [K]) of the K images with ground truth,
    in row order, in one chunked pass."""
    arrays = labels.directory / LABELS_DIR
    tallies = {group: (0, 0) for group in GROUPS}
    margins, rights = [np.zeros(0, np.float32)], [np.zeros(0, bool)]
    for (known, right, single), label, margin in zip(Truth(labels).chunks(), read_chunks(arrays / "label.npy"),
                                                     read_chunks(arrays / "margin.npy")):
        right, labelled, single = right[known], label[known] >= 0, single[known]
        for group, rows in GROUPS.items():
            selected = rows(labelled, single)
            tallies[group] = (tallies[group][0] + int(selected.sum()), tallies[group][1] + int(right[selected].sum()))
        margins.append(margin[known])
        rights.append(right)
    return tallies, np.concatenate(margins), np.concatenate(rights)


def precision_coverage(margins: np.ndarray, right: np.ndarray) -> list[dict[str, float]]:
    """Precision of the nearest concept among the images of highest margin (ties: the earlier row first), at each
    coverage of COVERAGES."""
    sizes = [max(1, round(coverage * len(margins))) for coverage in COVERAGES]
    ranked = margins.copy()
    ranked.partition(sorted({len(margins) - n for n in sizes}))  # the n-th largest margin at len - n
    points = []
    for coverage, n in zip(COVERAGES, sizes):
        threshold = ranked[len(margins) - n]
        above = margins > threshold
        ties = np.flatnonzero(margins == threshold)[: n - int(above.sum())]
        hits = int(right[above].sum()) + int(right[ties].sum())
        points.append({"coverage": coverage, "min_margin": round(float(threshold), 4),
                       "precision": round(100.0 * hits / n, 2), "images": n})
    return points


def _percent(hits: int, count: int) -> float:
    """100 x hits / count as `clipkd label stats` has always printed it: a float32 mean, rounded to 2 decimals."""
    return round(100.0 * float(np.float32(hits) / np.float32(count)), 2)


def label_stats(directory: str | Path) -> dict:
    """Statistics of a labelling output folder; also written to DIR/stats.json."""
    labels = load_labels(directory)
    arrays = labels.directory / LABELS_DIR
    samples = len(labels)
    labelled = sum(int((chunk >= 0).sum()) for chunk in read_chunks(arrays / "label.npy"))
    counts = labels.counts.numpy()
    order = np.lexsort((np.arange(len(counts)), -counts)).tolist()  # most images first, then class index
    counts = counts.tolist()
    stats: dict = {
        "samples": samples, "labelled": labelled, "classes": len(labels.concepts),
        "coverage": _percent(labelled, samples) if samples else 0.0,
        "histogram": {labels.concepts[c]: counts[c] for c in order},
        "most": [[labels.concepts[c], counts[c]] for c in order[:10]],
        "fewest": [[labels.concepts[c], counts[c]] for c in order[::-1][:10]],
        "score": _distribution(read_array(arrays / "score.npy")),
        "margin": _distribution(read_array(arrays / "margin.npy")),
    }
    tallies, margins, right = ground_truth(labels)
    if len(margins):
        stats["ground_truth"] = {
            "images": len(margins),
            **{group: _percent(hits, images) if images else None for group, (images, hits) in tallies.items()},
            "precision_vs_coverage": precision_coverage(margins, right),
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


def precision_curve(margins: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, precision %) at CURVE_BINS margin thresholds, highest margin first: the plotted curve (exact at
    each bin edge; the images of a bin enter together)."""
    images, edges = np.histogram(margins, bins=CURVE_BINS)
    hits, _ = np.histogram(margins[right], bins=edges)
    images, hits = np.cumsum(images[::-1]), np.cumsum(hits[::-1])
    kept = images > 0
    return images[kept] / len(margins), 100.0 * hits[kept] / images[kept]


def plot_stats(directory: str | Path, path: Path) -> Path:
    """A PNG: images per class, score and margin histograms, and precision vs coverage when ground truth exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipkd_dino.files import write_atomic

    labels = load_labels(directory)
    _, margins, right = ground_truth(labels)
    panels = 4 if len(margins) else 3
    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.8))
    counts = labels.counts.numpy()
    shown = np.argsort(-counts, kind="stable")[:40]
    axes[0].bar(range(len(shown)), counts[shown].tolist())
    axes[0].set_xticks(range(len(shown)), [labels.concepts[i] for i in shown], rotation=90, fontsize=7)
    axes[0].set_title(f"images per class ({len(labels.concepts)} classes)")
    for axis, name, title in ((axes[1], "score", "score (cosine to the nearest concept)"),
                              (axes[2], "margin", "margin over the runner-up")):
        values = read_array(labels.directory / LABELS_DIR / f"{name}.npy")
        if len(values):
            axis.stairs(*np.histogram(values, bins=40), fill=True)
        axis.set_title(title)
    if len(margins):
        coverage, precision = precision_curve(margins, right)
        axes[3].plot(coverage, precision)
        axes[3].set_xlabel("coverage (images kept, highest margin first)")
        axes[3].set_ylabel("precision (%)")
        axes[3].set_title("pseudo-label precision vs coverage")
        axes[3].grid(alpha=0.3)
    figure.tight_layout()
    write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=110))
    plt.close(figure)
    return path
