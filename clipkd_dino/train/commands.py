"""`clipkd train CONFIG.yaml [key=value ...] [--resume latest|auto|PATH [--new-stream]]`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a CLIP model (single process or under torchrun)",
        description="Train a CLIP model from a YAML config. Override any key with key.sub=value "
                    "(e.g. train.epochs=3 data.workers=0). Launch with torchrun for several processes.",
    )
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    parser.add_argument("--resume", metavar="latest|auto|PATH",
                        help="continue from OUTPUT_DIR/checkpoints/latest.pt ('latest'; 'auto': when it exists, else "
                             "start fresh, for torchrun --max-restarts) or a checkpoint file")
    parser.add_argument("--new-stream", action="store_true",
                        help="with --resume: accept a data stream other than the saved one (other shards, batch "
                             "size, workers, processes, seed...): the epoch's remaining steps run on the new stream")
    parser.add_argument("--max-bad-fraction", type=float, metavar="F",
                        help="stop once more than this fraction of the samples read were bad (sets the config key "
                             "data.max_bad_fraction)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from clipkd_dino.config import load_config, with_bad_fraction
    from clipkd_dino.report import format_summary
    from clipkd_dino.train.trainer import train

    summary = train(load_config(args.config, with_bad_fraction(args)), resume=args.resume,
                    new_stream=args.new_stream)
    if os.environ.get("RANK", "0") == "0":
        print(format_summary(summary))
    return 0
