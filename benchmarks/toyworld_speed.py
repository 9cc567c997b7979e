"""Time `clipkd toyworld` generation with 1 and 2 worker processes and print a table.

    python benchmarks/toyworld_speed.py [--images 10000] [--image-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from clipkd_dino.toyworld.generate import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"{'workers':>7} {'images':>7} {'seconds':>8} {'images/s':>9} {'MB written':>11}")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            generate(Path(out) / "tw", n_train=args.images, n_val=0, image_size=args.image_size, seed=0,
                     workers=workers)
            seconds = time.perf_counter() - start
            written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 1e6
        print(f"{workers:>7} {args.images:>7} {seconds:8.1f} {args.images / seconds:9.0f} {written:11.0f}")


if __name__ == "__main__":
    main()
