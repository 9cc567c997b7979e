"""CLI of the toy data set: `clipkd toyworld` (heavy imports happen in `run`, not here)."""

from __future__ import annotations

import argparse
import os
import time

DEFAULT_SHARD_SIZE = 1000  # the same as clipkd_dino.toyworld.generate.DEFAULT_SHARD_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toyworld",
        help="generate the embedded toy data set (drawn shapes with captions)",
        description="Draw 1 to 3 shapes (16 kinds, 10 colours) per image, write 5 captions per image, "
        "webdataset shards, CSV files and a zero-shot classification set. Same arguments, same bytes.",
    )
    parser.add_argument("--out", required=True, help="output directory (new, empty, or a previous toy world)")
    parser.add_argument("--train", type=int, default=40000, help="training images (default: 40000)")
    parser.add_argument("--val", type=int, default=2000, help="validation images (default: 2000)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes; does not change the output (default: min(2, CPUs))"
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"samples per webdataset shard (default: {DEFAULT_SHARD_SIZE})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipkd_dino.toyworld.generate import describe, generate

    workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    start = time.perf_counter()
    summary = generate(args.out, args.train, args.val, args.image_size, args.seed, workers, args.shard_size)
    print(describe(summary, args.out, time.perf_counter() - start, workers))
    return 0
