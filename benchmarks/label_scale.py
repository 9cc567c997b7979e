"""The labelling pass and its readers at the published scale's shape, on data this machine can carry.

    python benchmarks/label_scale.py [--concepts 10000] [--units 200 2000] [--images-per-unit 8] [--ranks 2]
                                     [--reader-samples 13000000]

Labelling rows: a random teacher with open_clip's tokenizer and a 512-dim head (tiny towers, 32 px, so the forwards
cost little), C concepts (one prompt each), webdataset shards of a few small JPEGs each, `clipkd label
--cache-views 1` under torchrun with R gloo ranks (no loader workers, so each rank's RSS is the whole rank). Columns:
peak RSS of each rank at start-up (imports, teacher, concept embeddings) and while labelling its units (in brackets:
above the RSS the labelling began with, i.e. what the units themselves cost), peak RSS
of the merge (a rerun in one process that finds every part done), bytes of the parts per unit, bytes per sample of
labels + index and of the cache, merge seconds. Flat means: the U2 row's RSS within 10% of the U1 row's.

Reader row: a synthetic labelling output of N samples (sorted identity index, labels, caption offsets; the
embeddings are left out), opened in a fresh process as training does; lookups of batches of 1,024 random present
identities. Columns: bytes on disk per sample, private (anonymous) RSS gained by opening and by 2,000 lookups,
file-backed RSS gained (the arrays' pages: shared page cache, the same pages for every rank and loader worker),
microseconds per batch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = {  # a 512-dim head on tiny towers, open_clip's full vocabulary and context
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------------------------ data and teacher
def make_teacher(folder: Path) -> str:
    import open_clip
    import torch

    from clipkd_dino.export.open_clip_folder import export_model

    configs = folder / "configs"
    configs.mkdir(parents=True)
    (configs / "scale-teacher.json").write_text(json.dumps(TEACHER_CONFIG))
    open_clip.add_model_config(configs)
    torch.manual_seed(0)
    export_model(open_clip.create_model("scale-teacher"), "scale-teacher", folder / "teacher")
    return f"local-dir:{folder / 'teacher'}"


def make_pool(path: Path, concepts: int) -> Path:
    path.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": f"thing{i:05d}", "count": concepts - i}
                                             for i in range(concepts)]}))
    (path.parent / "templates.json").write_text(json.dumps(["a photo of a {}"]))
    return path


def make_shards(folder: Path, units: int, per_unit: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(per_unit):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    folder.mkdir(parents=True)
    for unit in range(units):
        with tarfile.open(folder / f"{unit:05d}.tar", "w") as archive:
            for i, data in enumerate(images):
                key = f"{unit:05d}{i:04d}"  # img2dataset style: shard number + offset
                for ext, payload in (("jpg", data), ("txt", f"a photo number {i} of shard {unit}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return folder


# ------------------------------------------------------------------------------------------------ one labelling run
def rank_main(args: argparse.Namespace) -> None:
    """One process of a run: label (under torchrun, with `--skip-merge` the merge is left to a later run), sampling
    this process's RSS every 20 ms by phase: start-up (imports, teacher, concept embeddings), labelling, merge."""
    from clipkd_dino.teacher import label_pass

    peaks: dict[str, float] = {}
    phase = ["start-up"]

    def sample() -> None:
        while True:
            peaks[phase[0]] = max(peaks.get(phase[0], 0), rss_kib())
            time.sleep(0.02)

    def in_phase(name: str, method):
        def run(self, *args):
            peaks[f"{name} start"] = rss_kib()  # what the phase inherits (freed memory is not always returned)
            phase[0] = name
            return method(self, *args)
        return run

    threading.Thread(target=sample, daemon=True).start()
    label_pass.LabelPass._label = in_phase("labelling", label_pass.LabelPass._label)
    label_pass.LabelPass._merge = in_phase("merge", (lambda self, seconds: {}) if args.skip_merge
                                           else label_pass.LabelPass._merge)
    settings = label_pass.LabelSettings(teacher=args.teacher, teacher_pretrained=None, concepts=args.pool,
                                        data=args.data, out=args.out, templates=args.templates, cache_views=1,
                                        workers=0, batch_size=64, device="cpu")
    label_pass.label_dataset(settings)
    time.sleep(0.05)
    report = {"rank": int(os.environ.get("RANK", "0")), "peaks_kib": peaks}
    Path(args.report).with_suffix(f".rank{report['rank']}.json").write_text(json.dumps(report))


def label_run(tmp: Path, teacher: str, pool: Path, units: int, per_unit: int, ranks: int) -> dict:
    data = make_shards(tmp / f"shards{units}", units, per_unit)
    out = tmp / f"out{units}"
    common = ["--teacher", teacher, "--pool", str(pool), "--templates", str(pool.parent / "templates.json"),
              "--data", str(data), "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                    "--master_port", str(29500 + units % 1000), __file__, "--as-rank", "--skip-merge", *common,
                    "--report", str(tmp / f"label{units}")], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - start
    labelling = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"label{units}.rank*.json"))]
    parts = sum(p.stat().st_size for p in (out / "parts").iterdir())
    # the merge alone: a rerun in one process finds every part done and only merges
    subprocess.run([sys.executable, __file__, "--as-rank", *common, "--report", str(tmp / f"merge{units}")],
                   check=True, env=env, capture_output=True)
    merge = json.loads((tmp / f"merge{units}.rank0.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    labels = sum(p.stat().st_size for d in ("labels", "samples") for p in (out / d).iterdir())
    cache = sum(p.stat().st_size for p in (out / "cache").iterdir())
    return {"units": units, "samples": summary["samples"], "wall": wall, "ranks": labelling,
            "merge_seconds": summary["merge_seconds"], "merge_peak_kib": merge["peaks_kib"]["merge"],
            "parts_bytes_per_unit": parts / units, "labels_bytes_per_sample": labels / summary["samples"],
            "cache_bytes_per_sample": cache / summary["samples"]}


# ------------------------------------------------------------------------------------------------ the reader
def make_reader_output(folder: Path, samples: int) -> None:
    from clipkd_dino.data.identity import SampleIndex

    for name in ("samples", "labels", "cache"):
        (folder / name).mkdir(parents=True)
    rng = np.random.default_rng(1)
    hashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, samples, dtype=np.int64)
    np.save(folder / "hashes_for_queries.npy", hashes[rng.integers(0, samples, 2_000 * 1024)])
    index, _ = SampleIndex.build(hashes)
    del hashes
    index.save(folder / "samples")
    np.save(folder / "labels" / "label.npy", rng.integers(-1, 10_000, samples, dtype=np.int32))
    np.save(folder / "cache" / "caption_offsets.npy", np.arange(samples + 1, dtype=np.int64))


def reader_main(args: argparse.Namespace) -> None:
    """In a fresh process: open the index, labels and caption offsets as training does, then look batches up."""
    import torch  # noqa: F401  (training processes have it loaded: count its memory before opening)

    from clipkd_dino.data.identity import SampleIndex

    folder = Path(args.reader)
    queries = np.load(folder / "hashes_for_queries.npy")
    before, file_before = rss_kib("RssAnon"), rss_kib("RssFile")
    index = SampleIndex.load(folder / "samples")
    label = np.load(folder / "labels" / "label.npy", mmap_mode="r")
    offsets = np.load(folder / "cache" / "caption_offsets.npy", mmap_mode="r")
    opened = rss_kib("RssAnon")
    start = time.perf_counter()
    batches = len(queries) // 1024
    for b in range(batches):
        rows = index.lookup(queries[b * 1024:(b + 1) * 1024])
        assert (rows >= 0).all()
        label[rows], offsets[rows]  # noqa: B018  (the reads a batch makes)
    seconds = time.perf_counter() - start
    print(json.dumps({"anon_open_kib": opened - before, "anon_after_kib": rss_kib("RssAnon") - before,
                      "file_kib": rss_kib("RssFile") - file_before, "us_per_batch": 1e6 * seconds / batches}))


def reader_row(tmp: Path, samples: int) -> dict:
    folder = tmp / "reader"
    start = time.perf_counter()
    make_reader_output(folder, samples)
    build = time.perf_counter() - start
    disk = sum(p.stat().st_size for d in ("samples", "labels", "cache") for p in (folder / d).iterdir())
    result = subprocess.run([sys.executable, __file__, "--reader", str(folder)], check=True, capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return {"samples": samples, "build_seconds": build, "disk_bytes_per_sample": disk / samples,
            **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=10_000)
    parser.add_argument("--units", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--images-per-unit", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reader-samples", type=int, default=13_000_000)
    parser.add_argument("--as-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-merge", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    for hidden in ("--teacher", "--pool", "--templates", "--data", "--out", "--report"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_rank:
        from clipkd_dino.engine.distributed import finish_process

        rank_main(args)
        sys.exit(finish_process(0))
    if args.reader:
        return reader_main(args)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        teacher = make_teacher(tmp)
        pool = make_pool(tmp / "pool.json", args.concepts)
        print(f"\nlabelling: C = {args.concepts} concepts, D = 512, {args.ranks} gloo ranks, "
              f"{args.images_per_unit} images per unit, cache K = 1 (fp16)")
        print("| units | samples | start-up peak RSS per rank (MiB) | labelling peak RSS per rank (+ growth) (MiB) | "
              "merge peak "
              "RSS (MiB) | merge s | parts bytes/unit | labels+index bytes/sample | cache bytes/sample | wall s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for units in args.units:
            row = label_run(tmp, teacher, pool, units, args.images_per_unit, args.ranks)
            start_up = " / ".join(f"{r['peaks_kib']['start-up'] / 1024:.0f}" for r in row["ranks"])
            labelling = " / ".join(f"{r['peaks_kib']['labelling'] / 1024:.0f} "
                                   f"(+{(r['peaks_kib']['labelling'] - r['peaks_kib']['labelling start']) / 1024:.0f})"
                                   for r in row["ranks"])
            print(f"| {units} | {row['samples']} | {start_up} | {labelling} | {row['merge_peak_kib'] / 1024:.0f} | "
                  f"{row['merge_seconds']:.1f} | {row['parts_bytes_per_unit']:,.0f} | "
                  f"{row['labels_bytes_per_sample']:.1f} | {row['cache_bytes_per_sample']:.0f} | {row['wall']:.0f} |",
                  flush=True)
        if args.reader_samples:
            row = reader_row(tmp, args.reader_samples)
            print(f"\nreader: {row['samples']:,} synthetic samples (index + labels + caption offsets; built in "
                  f"{row['build_seconds']:.1f} s)")
            print("| bytes on disk / sample | private RSS to open (MiB) | private RSS after 2,000 lookups (MiB) | "
                  "file-backed RSS, shared (MiB) | lookup of 1,024 (us) |")
            print("|---|---|---|---|---|")
            print(f"| {row['disk_bytes_per_sample']:.1f} | {row['anon_open_kib'] / 1024:.1f} | "
                  f"{row['anon_after_kib'] / 1024:.1f} | {row['file_kib'] / 1024:.0f} | {row['us_per_batch']:.0f} |")


if __name__ == "__main__":
    main()
