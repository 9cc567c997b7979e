"""Memory of CSV training data: the CsvTable-backed CsvPairs against the per-row Python lists it replaced.

    python benchmarks/csv_memory.py [--rows 1000000] [--workers 2] [--variants table lists]

Data: a synthetic open_clip CSV of N rows (tab-separated `filepath`, `title`): paths like
`images/000123/000123456.jpg`, captions of ~60 characters drawn from a word list, 20% of the images with a second
caption (the next row). Each variant runs in a fresh process: it builds the dataset, then forks W workers (as
DataLoader workers are forked) that each read every row's fields the way `CsvPairs.__getitem__` does, without
decoding the image (UTF-8 flag, image path joined to the CSV's folder, caption, key, caption index).
Rows:
  table   CsvPairs (clipkd_dino.data.csv_table.CsvTable: one text buffer, offsets and per-row arrays)
  lists   the CsvPairs of before (kept below): csv.DictReader into 5 Python lists of N (keys, image paths, captions,
          UTF-8 flags, caption indices)
Columns: rows; text bytes (image paths + captions, UTF-8); build seconds; parent RSS gained by the build per row;
per worker after reading every row (mean over workers; /proc/PID/smaps_rollup): private bytes (Private_Clean +
Private_Dirty, what the worker's own copy costs) and shared bytes (Shared_Clean + Shared_Dirty) per row, both less
those of a worker forked before the build that reads nothing (the interpreter, torch, the libraries: its MB are in
the last column), and microseconds per row read (mostly `Path` joins; an image decode costs milliseconds).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path

from clipkd_dino.data.identity import csv_source, sample_identity
from clipkd_dino.data.pairs import CsvPairs, PairImages

WORDS = ("a photo of the red blue small large old new wooden metal dog cat man woman child car house tree street "
         "city beach mountain river table chair window garden night morning with on in near at under over "
         "standing sitting walking running holding looking playing two three white black green").split()


class ListPairs:
    """The CsvPairs of before this table (its __init__ as it was), for comparison: 5 Python lists of N."""

    def __init__(self, path: str, img_key="filepath", caption_key="title", separator="\t"):
        self.path = Path(path)
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            rows = [(row[img_key], row[caption_key] or "") for row in csv.DictReader(handle, delimiter=separator)]
        source = csv_source(path)
        self.keys = [sample_identity(source, image) for image, _ in rows]
        self.images = [str(self.path.parent / image) for image, _ in rows]
        self.captions = [caption for _, caption in rows]
        self.utf8 = [_is_utf8(image + caption) for image, caption in rows]
        seen: Counter = Counter()
        self.caption_index = []
        for (key, caption), utf8 in zip(rows, self.utf8):
            self.caption_index.append(seen[key])
            seen[key] += bool(caption.strip()) and utf8

    def __len__(self) -> int:
        return len(self.images)

    def fields(self, index: int) -> tuple:
        return self.utf8[index], self.images[index], self.captions[index], self.keys[index], self.caption_index[index]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def table_fields(dataset: CsvPairs, index: int) -> tuple:
    """What CsvPairs.__getitem__ reads of a row, without loading its image."""
    table = dataset.table
    image = table.image_path(index)
    return (table.utf8(index), str(dataset.path.parent / image), table.caption(index),
            sample_identity(dataset.source, image), int(table.caption_index[index]))


def write_csv(path: Path, rows: int) -> None:
    draw = random.Random(0)
    with open(path, "w", encoding="utf-8") as out:
        out.write("filepath\ttitle\n")
        image, written = 0, 0
        while written < rows:
            for _ in range(2 if image % 5 == 0 else 1):
                if written < rows:
                    caption = " ".join(draw.choice(WORDS) for _ in range(draw.randint(8, 14)))
                    out.write(f"images/{image // 1000:06d}/{image:09d}.jpg\t{caption}\n")
                    written += 1
            image += 1


def memory() -> dict[str, int]:
    """Bytes of this process's smaps_rollup fields."""
    with open("/proc/self/smaps_rollup") as rollup:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup if line.rstrip().endswith("kB")}


def forked(work) -> dict:
    """Run `work()` in a forked process; its report: (private, shared) bytes from smaps_rollup and seconds."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        mine = memory()
        report = {"private": mine["Private_Clean"] + mine["Private_Dirty"],
                  "shared": mine["Shared_Clean"] + mine["Shared_Dirty"], "seconds": seconds}
        os.write(writer, json.dumps(report).encode())
        os._exit(0)
    os.close(writer)
    return {"pid": pid, "reader": reader}


def collect(started: dict) -> dict:
    with os.fdopen(started["reader"]) as stream:
        report = json.loads(stream.read())
    os.waitpid(started["pid"], 0)
    return report


def child(variant: str, path: str, workers: int) -> dict:
    baseline = collect(forked(lambda: None))
    before = memory()["Rss"]
    start = time.perf_counter()
    if variant == "table":
        dataset = CsvPairs(path, PairImages(transform=None), tokenizer=None)
        read, text = (lambda i: table_fields(dataset, i)), dataset.table.text.nbytes
    else:
        dataset = ListPairs(path)
        read = dataset.fields
        text = sum(len(s.encode("utf-8", "surrogateescape")) for s in dataset.captions)
        text += sum(len(key.partition("/")[2].encode("utf-8", "surrogateescape")) for key in dataset.keys)
    build = time.perf_counter() - start
    rows = len(dataset)
    result = {"rows": rows, "text": text, "build_s": build, "parent_rss": (memory()["Rss"] - before) / rows}
    read_all = lambda: deque(map(read, range(rows)), maxlen=0)  # every row read, nothing kept
    reports = [collect(started) for started in [forked(read_all) for _ in range(workers)]]
    for name in ("private", "shared"):
        result[name] = (sum(report[name] for report in reports) / len(reports) - baseline[name]) / rows
    result["us"] = sum(report["seconds"] for report in reports) / len(reports) / rows * 1e6
    result["baseline"] = f"{baseline['private'] / 2**20:.0f} / {baseline['shared'] / 2**20:.0f}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["table", "lists"], choices=["table", "lists"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.csv, args.workers)))
        return
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; {args.rows:,} rows, "
          f"{args.workers} forked workers")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.csv"
        write_csv(path, args.rows)
        print(f"| variant | rows | text bytes | build s | parent RSS B/row | worker private B/row | "
              f"worker shared B/row | read us/row | idle worker private / shared MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for variant in args.variants:
            output = subprocess.run([sys.executable, __file__, "--child", variant, "--csv", str(path), "--workers",
                                     str(args.workers)], check=True, capture_output=True, text=True).stdout
            r = json.loads(output.strip().splitlines()[-1])
            print(f"| {variant} | {r['rows']:,} | {r['text']:,} | {r['build_s']:.1f} | {r['parent_rss']:.0f} | "
                  f"{r['private']:.0f} | {r['shared']:.0f} | {r['us']:.1f} | {r['baseline']} |")


if __name__ == "__main__":
    main()
