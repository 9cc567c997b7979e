"""The demo's recorded study: does the dino-loss move the same-dim student? Paired by seed, with 95% intervals.

    nohup nice -n 5 .venv/bin/python benchmarks/demo_study.py > runs/study.log 2>&1 &

Parts, in this order (each writes OUT/results.md and OUT/results.json when it ends, so a stopped study keeps what
finished; a rerun reuses every student whose run folder already holds a summary.json):
  demo     `clipkd demo --data DATA --out OUT/demo`: the default demo, timed (toyworld generated when missing, the
           concept pool, the labelling pass, seed 0 of the three students);
  seeds    CLIP-KD and CLIP-KD + dino at the demo's schedule over seeds 0-4 (seed 0: the demo's own runs), from
           the demo's data and labelling output;
  cls      `clipkd demo --cls --seeds 5 --out OUT/cls` (KD vs KD++ on scikit-learn's digits);
  margin   the label-quality lever: one more labelling pass with `--min-margin` at the all-labels margin of 50%
           coverage (from the demo's precision-vs-coverage table), then CLIP-KD + dino over seeds 0-2, paired
           against CLIP-KD (whose runs ignore the labels: reused when the teacher-embedding cache is the same) and
           against CLIP-KD + dino on all labels;
  long     CLIP-KD and CLIP-KD + dino at four times the demo's steps (8 epochs), seeds 0-2, results after each seed.

Every student is `clipkd train configs/toy_distill.yaml OVERRIDES` with the overrides recorded in results.json
("command"), so any one of them can be re-run by hand from the repository root. No setting is tuned: the demo's
defaults throughout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from clipkd_dino.demo import (FULL, SHIPPED_TEACHER, SMOKE, StudentPlan, comparison_table, label, paired_rows,
                              run_name, student_overrides, student_shards, train_students)
from clipkd_dino.files import write_json_atomic
from clipkd_dino.report import paired_summary, paired_table, paired_words

REPO = Path(__file__).resolve().parents[1]
KD, DINO = "CLIP-KD", "CLIP-KD + dino"
DINO_MARGIN = "CLIP-KD + dino, min-margin labels"
PARTS = ("demo", "seeds", "cls", "margin", "long")


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def timed_command(argv: list[str]) -> dict:
    """Run a command from the repository root; its wall seconds and the machine's load before and after."""
    print(f"[study] $ {shlex.join(argv)}  ({load()})", flush=True)
    before, start = load(), time.time()
    subprocess.run(argv, cwd=REPO, check=True)
    return {"command": shlex.join(argv), "seconds": round(time.time() - start, 1), "load_before": before,
            "load_after": load()}


def students(plan: StudentPlan, out: Path, seeds: range, names: tuple[str, ...], label_as: str | None = None
             ) -> list[dict]:
    """Each (seed, name) student: read from its run folder when it has finished there, else trained. `label_as`
    renames the runs in the records (the same recipe on other labels)."""
    runs = []
    for seed in seeds:
        for name in names:
            run_dir = out / "students" / run_name(name, seed)
            done = run_dir / "summary.json"
            record = ({"name": name, "seed": seed, "dir": str(run_dir), "summary": json.loads(done.read_text())}
                      if done.is_file() else train_students(plan, out, range(seed, seed + 1), (name,))[0])
            record["command"] = shlex.join(["clipkd", "train", "configs/toy_distill.yaml",
                                            *student_overrides(plan, name, seed, run_dir)])
            runs.append(record | {"name": label_as or name})
    return runs


def cache_digest(labels: Path) -> str:
    """sha256 over the teacher-embedding cache's arrays (names and bytes; its manifest names the pass's settings,
    --min-margin included, so it is left out)."""
    digest = hashlib.sha256()
    for path in sorted((labels / "cache").rglob("*.npy")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def margin_at_half_coverage(labels_stats: dict) -> tuple[float, float]:
    """(min margin, its precision) of the precision-vs-coverage row nearest to 50% coverage."""
    rows = labels_stats["ground_truth"]["precision_vs_coverage"]
    row = min(rows, key=lambda r: abs(r["coverage"] - 0.5))
    return row["min_margin"], row["precision"]


def section(title: str, runs: list[dict], pairs: list[tuple[str, str]], note: str = "") -> str:
    """A results section: the comparison table (mean ± sd) and one paired table per (treated, control)."""
    lines = [f"## {title}", "", note, "", comparison_table(None, runs), ""]
    for treated, control in pairs:
        rows = paired_rows(runs, treated, control)
        if rows:
            lines += [f"Paired: {treated} minus {control}", "", paired_table(rows, treated, control), "",
                      paired_words(rows), ""]
    return "\n".join(lines)


def write_results(out: Path, results: dict) -> None:
    """OUT/results.json (every number and command) and OUT/results.md (the tables)."""
    write_json_atomic(out / "results.json", results)
    text = ["# Demo study", "", f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')} ({load()}).", ""]
    text += [part["markdown"] for part in results["parts"].values() if "markdown" in part]
    (out / "results.md").write_text("\n".join(text) + "\n")


def record_part(out: Path, results: dict, name: str, runs: list[dict], markdown: str, **extra) -> None:
    results["parts"][name] = {"markdown": markdown, **extra, "runs": [
        {"name": r["name"], "seed": r["seed"], "dir": r["dir"], "command": r.get("command"),
         "train_seconds": r["summary"]["wall_seconds"], "metrics": r["summary"]["metrics"]} for r in runs]}
    for treated, control in extra.get("pairs", []):
        results["parts"][name].setdefault("paired", {})[f"{treated} - {control}"] = paired_summary(
            paired_rows(runs, treated, control))
    write_results(out, results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--data", default="data/toyworld")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="every part on the demo's smoke scale (a check of "
                        "this script: use other --out and --data)")
    args = parser.parse_args()
    out, data, scale = Path(args.out), Path(args.data), SMOKE if args.smoke else FULL
    smoke = ["--smoke"] if args.smoke else []
    clipkd = str(Path(sys.executable).with_name("clipkd"))
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"parts": {}}
    demo_out = out / "demo"
    plan = StudentPlan(data, scale, demo_out / "labels", device=args.device)
    start = time.time()

    if "demo" in args.parts:
        timing = timed_command([clipkd, "demo", *smoke, "--data", str(data), "--out", str(demo_out),
                                "--device", args.device])
        summary = json.loads((demo_out / "summary.json").read_text())
        results["parts"]["demo"] = {"timing": timing, "markdown": "\n".join([
            "## The default demo (`clipkd demo`, 1 seed, three students)", "",
            f"`{timing['command']}`: {timing['seconds']:.0f} s ({timing['seconds'] / 60:.1f} min) wall, "
            f"{timing['load_before']} before, {timing['load_after']} after.", "",
            comparison_table(summary["teacher"]["metrics"], [
                {"name": s["name"], "seed": s["seed"], "summary": {"metrics": s["metrics"],
                                                                   "wall_seconds": s["train_seconds"]}}
                for s in summary["students"]]), ""])}
        write_results(out, results)

    if "seeds" in args.parts:
        runs = students(plan, demo_out, range(5), (KD, DINO))
        record_part(out, results, "seeds", runs, section(
            "Same-dim student (toy-student-96) at the demo's schedule, seeds 0-4", runs, [(DINO, KD)],
            "2 epochs (250 steps of 128) on the demo's 16,000 labelled images; seed 0: the default demo's runs."),
            pairs=[(DINO, KD)])

    if "cls" in args.parts:
        timing = timed_command([clipkd, "demo", "--cls", *smoke, "--seeds", "5", "--out", str(out / "cls"), "--device",
                                args.device])
        report = (out / "cls" / "report.md").read_text()
        body = report.split("\n\n", 1)[1]
        results["parts"]["cls"] = {"timing": timing, "summary": json.loads((out / "cls" / "summary.json")
                                                                           .read_text()),
                                   "markdown": f"## `clipkd demo --cls --seeds 5`\n\n`{timing['command']}`: "
                                               f"{timing['seconds']:.0f} s wall ({timing['load_after']} after)."
                                               f"\n\n{body}"}
        write_results(out, results)

    if "margin" in args.parts:
        stats = json.loads((demo_out / "summary.json").read_text())["labels"]
        margin, expected_precision = margin_at_half_coverage(stats)
        margin_out = out / "margin"
        margin_labels = margin_out / "labels"
        label(str(SHIPPED_TEACHER), demo_out / "pool.json", data, scale, margin_out, margin, args.device)  # resumes
        from clipkd_dino.teacher.stats import label_stats

        margin_stats = label_stats(margin_labels)
        same_cache = cache_digest(margin_labels) == cache_digest(demo_out / "labels")
        margin_plan = StudentPlan(data, scale, margin_labels, device=args.device)
        control = students(plan, demo_out, range(3), (KD, DINO))
        treated = students(margin_plan, margin_out, range(3), (DINO,), label_as=DINO_MARGIN)
        if not same_cache:  # CLIP-KD's own views differ: train it on these labels' cache
            control = [r for r in control if r["name"] == DINO] + students(margin_plan, margin_out, range(3), (KD,))
        runs = control + treated
        truth = margin_stats.get("ground_truth", {})
        note = (f"Labelling pass with `--min-margin {margin}` (the all-labels margin at 50% coverage, "
                f"{expected_precision:.1f}% precision there): {margin_stats['coverage']:.1f}% coverage, "
                f"{truth.get('precision_labelled', float('nan')):.1f}% of labelled images right (all labels: "
                f"{stats['coverage']:.1f}% coverage, {stats['ground_truth']['precision_labelled']:.1f}%). "
                f"Teacher-embedding cache {'identical to' if same_cache else 'different from'} the demo's "
                f"(sha256 of its arrays): CLIP-KD, which reads no label, is "
                f"{'the same run as in the seeds part, reused' if same_cache else 'retrained on this cache'}.")
        record_part(out, results, "margin", runs, section(
            "Label quality: min-margin labels at about 50% coverage, seeds 0-2", runs,
            [(DINO_MARGIN, KD), (DINO_MARGIN, DINO), (DINO, KD)], note),
            pairs=[(DINO_MARGIN, KD), (DINO_MARGIN, DINO)], min_margin=margin, label_stats=margin_stats,
            same_cache=same_cache,
            label_command=shlex.join(["clipkd", "label", "--teacher", "toy-teacher", "--teacher-pretrained",
                                      str(SHIPPED_TEACHER.relative_to(REPO)), "--concepts",
                                      str(demo_out / "pool.json"), "--top-k", "16", "--data",
                                      student_shards(data, scale.student_shards),
                                      "--templates", str(data / "val" / "zeroshot" / "templates.json"),
                                      "--min-margin", str(margin), "--cache-views", "2", "--crop-scale", "0.8",
                                      "1.0", "--workers", "2", "--out", str(margin_labels)]))

    if "long" in args.parts:
        long_out = out / "long"
        long_plan = StudentPlan(data, scale, demo_out / "labels", epochs=4 * scale.epochs, device=args.device)
        runs: list[dict] = []
        for seed in range(3):
            runs += students(long_plan, long_out, range(seed, seed + 1), (KD, DINO))
            record_part(out, results, "long", runs, section(
                f"Four times the demo's steps ({4 * scale.epochs} epochs), seeds 0-{seed}", runs, [(DINO, KD)],
                "Same data, labels and cache as the demo; the schedule's warm-up (100 steps) unchanged, the cosine "
                "over the 4x steps."), pairs=[(DINO, KD)])

    print(f"[study] done in {time.time() - start:.0f} s; {out / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
