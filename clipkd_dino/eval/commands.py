"""`clipkd eval`: retrieval and/or zero-shot metrics of a checkpoint, written as JSON and printed as a table.

Only argparse is imported at module level; the library is imported when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="retrieval Recall@K and zero-shot accuracy of a checkpoint",
        description="Evaluate a CLIP checkpoint: image-text retrieval Recall@1/5/10 under both protocols "
        "(any_caption = Karpathy style, one_to_one = first caption only) and/or zero-shot top-1/top-5.",
    )
    parser.add_argument("--model", required=True, help="architecture name (open_clip or a shipped config)")
    parser.add_argument("--pretrained", required=True, metavar="PATH", help="local checkpoint file")
    parser.add_argument("--retrieval", metavar="FILE", help="retrieval JSONL: one image per line with its captions")
    parser.add_argument("--zeroshot", metavar="DIR", help="dir with classnames.json, templates.json, samples.csv")
    parser.add_argument("--out", required=True, metavar="FILE", help="metrics JSON to write")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (CUDA only) (default: fp32)")
    parser.add_argument("--batch-size", type=_positive_int, default=256, help="default: 256")
    parser.add_argument("--workers", type=_non_negative_int, default=2, help="image loader processes (default: 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from datetime import datetime, timezone
    from pathlib import Path

    from clipkd_dino.errors import UserError
    from clipkd_dino.eval.evaluate import evaluate_model
    from clipkd_dino.eval.retrieval import PROTOCOLS, read_retrieval_file
    from clipkd_dino.eval.zeroshot import read_zeroshot_dir
    from clipkd_dino.files import write_json_atomic
    from clipkd_dino.models.factory import create_model, get_tokenizer, image_transforms
    from clipkd_dino.report import format_metrics
    from clipkd_dino.runtime import autocast, resolve_device

    if not args.retrieval and not args.zeroshot:
        raise UserError("nothing to evaluate: give --retrieval FILE and/or --zeroshot DIR")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out is a directory: {out}")
    device = resolve_device(args.device)
    autocast(device, args.precision)  # validates the precision for this device before any work
    retrieval = read_retrieval_file(args.retrieval) if args.retrieval else None
    zeroshot = read_zeroshot_dir(args.zeroshot) if args.zeroshot else None
    model = create_model(args.model, args.pretrained, device)
    metrics = evaluate_model(
        model,
        get_tokenizer(args.model),
        image_transforms(model, augment=False)[1],
        retrieval=retrieval,
        zeroshot=zeroshot,
        device=device,
        precision=args.precision,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    report = {
        "model": args.model,
        "pretrained": os.path.abspath(args.pretrained),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "precision": args.precision,
        **({"protocols": PROTOCOLS} if retrieval else {}),
        **metrics,
    }
    write_json_atomic(out, report)
    print(format_metrics(metrics))
    print(f"wrote {out}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
