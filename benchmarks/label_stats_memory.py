"""Memory and time of `clipkd label stats` on a synthetic labelling output of N samples.

    python benchmarks/label_stats_memory.py [--samples 2000000] [--concepts 10000] [--out DIR]

Writes, in the on-disk format `load_labels` reads (docs/labelling.md), N samples over C concepts: the identity
index, label / concept / score / margin arrays (margins on a 1e-4 grid, so the coverage curve meets ties), and a
truth.txt where 10% of the rows have no ground truth, 60% one kind (the nearest concept 70% of the time) and 30%
two kinds of the first 100 concepts: about 20,000 distinct truth strings. Then, in a fresh process: `label_stats` (stats.json), then
`plot_stats` (stats.png). Columns: seconds, peak RSS of the process (VmHWM), the peak above the RSS after imports,
and that per sample.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_output(out: Path, samples: int, concepts: int, seed: int = 0) -> None:
    """A labelling output of `samples` rows over `concepts` concepts (labels, index, truth, class means)."""
    import torch

    from clipkd_dino.data.identity import SampleIndex
    from clipkd_dino.teacher.class_means import ClassMeans, save_class_means

    rng = np.random.default_rng(seed)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    hashes = np.arange(samples, dtype=np.int64) * np.int64(-7046029254386353131)  # distinct (odd multiplier)
    SampleIndex.build(hashes)[0].save(out / "samples")
    concept = rng.integers(0, concepts, samples, dtype=np.int32)
    score = rng.uniform(0.1, 0.4, samples).astype(np.float32)
    margin = (np.round(rng.exponential(0.02, samples), 4)).astype(np.float32)
    label = np.where(margin >= 0.005, concept, -1).astype(np.int32)
    for name, array in (("label", label), ("concept", concept), ("score", score), ("margin", margin)):
        np.save(out / "labels" / f"{name}.npy", array)
    names = [f"concept{i:05d}" for i in range(concepts)]
    shape = rng.random(samples)
    kind = np.where(rng.random(samples) < 0.7, concept, rng.integers(0, 100, samples))  # single: often right
    first, second = rng.integers(0, 100, (2, samples))
    with open(out / "samples" / "truth.txt", "w", encoding="utf-8") as truth:
        for start in range(0, samples, 1 << 20):
            rows = range(start, min(samples, start + (1 << 20)))
            truth.write("".join("\n" if shape[i] < 0.1 else f"{names[kind[i]]}\n" if shape[i] < 0.7
                                else f"{names[first[i]]},{names[second[i]]}\n" for i in rows))
    counts = torch.from_numpy(np.bincount(label[label >= 0], minlength=concepts))
    save_class_means(out, ClassMeans(torch.zeros(concepts, 8), counts, names), {"concepts_searched": names})


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(directory: Path) -> None:
    """Run label_stats then plot_stats here; print one JSON line per step."""
    from clipkd_dino.teacher.stats import label_stats, plot_stats

    baseline = rss_kib("VmRSS")
    for step, run in (("label_stats", lambda: label_stats(directory)),
                      ("+ plot_stats", lambda: plot_stats(directory, directory / "stats.png"))):
        start = time.perf_counter()
        run()
        print(json.dumps({"step": step, "seconds": time.perf_counter() - start, "baseline_kib": baseline,
                          "peak_kib": rss_kib("VmHWM")}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2_000_000)
    parser.add_argument("--concepts", type=int, default=10_000)
    parser.add_argument("--out", type=Path, help="keep the synthetic output here (default: a temporary folder)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory() as temporary:
        out = args.out or Path(temporary)
        start = time.perf_counter()
        write_output(out, args.samples, args.concepts)
        print(f"{args.samples:,} samples, {args.concepts:,} concepts written in {time.perf_counter() - start:.0f} s")
        result = subprocess.run([sys.executable, __file__, "--child", str(out)], capture_output=True, text=True,
                                cwd=REPO, check=True)
        print(f"{'step':<14} {'seconds':>8} {'peak RSS MiB':>13} {'above imports MiB':>18} {'bytes/sample':>13}")
        for line in result.stdout.splitlines():
            row = json.loads(line)
            above = (row["peak_kib"] - row["baseline_kib"]) * 1024
            print(f"{row['step']:<14} {row['seconds']:>8.1f} {row['peak_kib'] / 1024:>13,.0f} "
                  f"{above / 2**20:>18,.0f} {above / args.samples:>13.1f}")


if __name__ == "__main__":
    main()
