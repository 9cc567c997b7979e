"""Concept-pool builder speed: captions/s and peak memory against the full spaCy pipeline, with an equality check.

    .venv/bin/python benchmarks/concepts_speed.py [--captions ../shared/data/coco/captions_val2017.json]

Each variant runs in its own process (so its peak memory is its own) and builds the COCO pool with phrases, every
concept kept (min count 1, no top-k). The baseline is the straightforward way: the full pipeline (all default
components) through `nlp.pipe`, every caption parsed. Each faster variant adds one lever; its concepts, counts and
collocations must equal the baseline's exactly. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CAPTIONS = ROOT.parent / "shared" / "data" / "coco" / "captions_val2017.json"

# name -> (description, BuildOptions overrides)
VARIANTS = {
    "baseline": ("full pipeline (6 components), blis, every caption parsed",
                 {"pipeline": "full", "cache_size": 0}),
    "tagger-only": ("tok2vec + tagger only; ruler and lemmatizer once per distinct (word, tag)",
                    {"pipeline": "fast", "cache_size": 0, "numpy_blas": False}),
    "fast": ("+ numpy's OpenBLAS, 1 thread, instead of blis", {"pipeline": "fast", "cache_size": 0}),
    "dedup": ("+ each distinct caption parsed once (the CLI default)", {"pipeline": "fast"}),
    "workers2": ("+ 2 worker processes", {"pipeline": "fast", "workers": 2}),
}


def run_variant(name: str, captions: Path, out: Path, repeat: int) -> dict:
    """Build the pool for one variant in this process; returns timings and peak memory."""
    import spacy  # noqa: F401 - imported first to measure its own memory (it pulls in torch through thinc)

    from clipkd_dino.concepts.build import BuildOptions, build_pool

    import_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    options = BuildOptions(phrases=True, top_k=None, min_count=1, progress=False, **VARIANTS[name][1])
    started = time.perf_counter()
    pool = build_pool([str(captions)] * repeat, options)
    wall = time.perf_counter() - started
    pool.save(out)
    peak_kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return {"variant": name, "repeat": repeat, "captions": pool.stats["captions_used"],
            "parse_seconds": pool.run["seconds"], "wall_seconds": round(wall, 2),
            "captions_per_second": pool.run["captions_per_second"], "distinct_parsed": pool.run["distinct_parsed"],
            "peak_rss_mib": round(peak_kib / 1024), "import_rss_mib": round(import_kib / 1024)}


def concepts_of(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    data = json.loads(path.read_text())
    return [(c["concept"], c["count"]) for c in data["concepts"]], [c["phrase"] for c in data["collocations"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS, help="COCO captions JSON")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1, help="read the file this many times (a repetitive corpus)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.captions, args.out, args.repeat)))
        return 0
    if not args.captions.is_file():
        print(f"captions file not found: {args.captions}", file=sys.stderr)
        return 2
    print(f"machine: {platform.processor() or platform.machine()}, {_cpu_model()}, python {platform.python_version()}")
    results, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            out = Path(tmp) / f"{name}.json"
            command = [sys.executable, __file__, "--child", name, "--captions", str(args.captions),
                       "--out", str(out), "--repeat", str(args.repeat)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                               cwd=ROOT).stdout.strip().splitlines()[-1])
            concepts, collocations = concepts_of(out)
            reference = reference or (concepts, collocations)
            result["identical"] = (concepts, collocations) == reference
            result["concepts"] = len(concepts)
            result["differences"] = _differences(reference[0], concepts)
            if result["differences"]:
                print(f"  {name}: {len(result['differences'])} counts differ: {result['differences'][:10]}")
            results.append(result)
            print(json.dumps(result), flush=True)
    print()
    print(table(results))
    return 0 if all(r["identical"] for r in results) else 1


def table(results: list[dict]) -> str:
    base = results[0]["captions_per_second"]
    lines = ["| variant | what runs | captions/s | speed-up | wall s | distinct parsed | peak RSS MiB "
             "(after `import spacy`) | same concepts and counts as baseline |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        same = "yes" if r["identical"] else f"no: {len(r['differences'])} counts differ"
        lines.append(f"| {r['variant']} | {VARIANTS[r['variant']][0]} | {r['captions_per_second']:,.0f} | "
                     f"{r['captions_per_second'] / base:.2f}x | {r['wall_seconds']:.1f} | "
                     f"{r['distinct_parsed']:,} | {r['peak_rss_mib']} ({r['import_rss_mib']}) | "
                     f"{same} ({r['concepts']:,} concepts) |")
    return "\n".join(lines)


def _differences(reference: list[tuple[str, int]], other: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(concept, baseline count, this count) wherever they differ."""
    a, b = dict(reference), dict(other)
    return sorted((k, a.get(k, 0), b.get(k, 0)) for k in set(a) | set(b) if a.get(k) != b.get(k))


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
