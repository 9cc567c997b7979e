"""`clipkd export CHECKPOINT [--out DIR] [--onnx DIR] [--hf DIR]`: a trained model for clients without this package.

Only argparse is imported at module level; the library (`clipkd_dino.export.targets`) when the command runs.
"""

from __future__ import annotations

import argparse

LOADS = {
    "out": "open_clip.create_model_and_transforms('local-dir:{folder}') loads it",
    "onnx": "image.onnx and text.onnx for onnxruntime; preprocessing and tokenizer in {folder}/clip_onnx.json",
    "hf": "transformers.CLIPModel.from_pretrained('{folder}') and CLIPProcessor.from_pretrained('{folder}') load it",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint's CLIP model for open_clip, onnxruntime or transformers",
        description="Write the CLIP model of a training checkpoint (CLIP or distillation; epoch_N.pt or latest.pt), "
        "nothing else (no projectors, no optimiser), to one or more new or empty folders: --out, an open_clip "
        "local-dir: model (open_clip_config.json + open_clip_model.safetensors); --onnx, the image and text towers "
        "as ONNX (dynamic batch) with their preprocessing and tokenizer settings, checked in onnxruntime; --hf, a "
        "transformers CLIPModel with its tokenizer and image processor (plain ViT CLIPs only), checked against "
        "open_clip. Each loads without this package.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file written by clipkd train")
    parser.add_argument("--out", metavar="DIR", help="open_clip local-dir: folder to write")
    parser.add_argument("--onnx", metavar="DIR", help="folder to write the ONNX towers to")
    parser.add_argument("--hf", metavar="DIR", help="folder to write the transformers CLIPModel to")
    parser.add_argument("--model", metavar="NAME", help="architecture, when the checkpoint does not name it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipkd_dino.export.targets import export_targets

    written = export_targets(args.checkpoint, args.model, out=args.out, onnx=args.onnx, hf=args.hf)
    for target, folder in written.items():
        print(f"wrote {folder}: {LOADS[target].format(folder=folder)}")
    return 0
