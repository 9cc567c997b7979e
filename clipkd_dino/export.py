"""`clipkd export CHECKPOINT --out DIR`: a trained model as an open_clip `local-dir:` folder.

Only argparse is imported at module level; the library (`clipkd_dino.models.export`) when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint's CLIP model as an open_clip local-dir: folder",
        description="Write the CLIP model of a training checkpoint (CLIP or distillation; epoch_N.pt or latest.pt) "
        "as open_clip_config.json + open_clip_model.safetensors, nothing else (no projectors, no optimiser): "
        "open_clip.create_model_and_transforms('local-dir:DIR') loads it without this package.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file written by clipkd train")
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty folder to write")
    parser.add_argument("--model", metavar="NAME", help="architecture, when the checkpoint does not name it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipkd_dino.models.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.model)
    print(f"wrote {out}: open_clip.create_model_and_transforms('local-dir:{out}') loads it")
    return 0
