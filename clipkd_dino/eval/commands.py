"""`clipkd eval`: retrieval and/or zero-shot metrics of any CLIP model, written as JSON plus a Markdown table;
`clipkd eval compare A.json B.json ...`: reports side by side.

Only argparse is imported at module level; the library is imported when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="retrieval Recall@K and zero-shot accuracy of a CLIP model; 'eval compare' puts reports side by side",
        description="Evaluate a CLIP model: image-text retrieval Recall@1/5/10 (i2t = image query, t2i = caption "
        "query) under both protocols (any_caption = Karpathy style, one_to_one = first caption only) and/or "
        "zero-shot top-1/top-5. Embeddings are cached on disk per model and data set. See docs/evaluation.md.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="NAME", help="open_clip architecture or shipped config, local-dir:DIR "
                       "(open_clip folder, e.g. from clipkd export) or hf:DIR (saved transformers CLIPModel); "
                       "default: the architecture named in the --pretrained training checkpoint")
    model.add_argument("--pretrained", metavar="PATH|TAG",
                       help="checkpoint file (ours or open_clip's) or open_clip tag")
    data = parser.add_argument_group("retrieval data (one of)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--karpathy", metavar="FILE", help="Karpathy split file (dataset_coco.json, "
                        "dataset_flickr30k.json); images at ROOT/filepath/filename")
    source.add_argument("--pairs", metavar="SOURCE", help="open_clip CSV or webdataset shards (as in clipkd train)")
    source.add_argument("--retrieval", metavar="FILE",
                        help="toyworld retrieval JSONL: one image per line with captions")
    data.add_argument("--images", metavar="ROOT", help="image root of --karpathy")
    data.add_argument("--split", default="test", help="Karpathy split (default: test)")
    data.add_argument("--format", default="auto", choices=("auto", "csv", "webdataset"), help="of --pairs")
    data.add_argument("--csv-img-key", default="filepath", help="--pairs CSV image column (default: filepath)")
    data.add_argument("--csv-caption-key", default="title", help="--pairs CSV caption column (default: title)")
    data.add_argument("--csv-separator", default="\t", help="--pairs CSV separator (default: tab)")
    zeroshot = parser.add_argument_group("zero-shot data")
    zeroshot.add_argument("--zeroshot", metavar="DIR", help="image folder (a sub-folder per class; ImageNet WNID "
                          "folders get the 1000 ImageNet names) or toyworld zero-shot dir (with samples.csv)")
    zeroshot.add_argument("--classnames", metavar="FILE", help="class names (JSON list or one per line, sorted "
                          "folder order)")
    zeroshot.add_argument("--templates", metavar="FILE", help="prompt templates with {} (JSON list or one per line; "
                          "default for image folders: OpenAI's 80 ImageNet templates)")
    run_options = parser.add_argument_group("run")
    run_options.add_argument("--out", metavar="FILE", help="metrics JSON to write (and FILE.md with the table)")
    run_options.add_argument("--clip-benchmark", metavar="DIR", help="also write the results in LAION "
                             "CLIP_benchmark's layout, a JSON per task in DIR (for `clip_benchmark build`)")
    run_options.add_argument("--skip-bad", action="store_true", help="skip missing, empty or corrupt images (with "
                             "their captions), images without captions, captions that are not UTF-8 and broken "
                             "shards, counted per reason in the JSON; default: the first is an error")
    run_options.add_argument("--max-bad-fraction", type=float, metavar="F",
                             help="with --skip-bad: fail when more than this fraction of a data set was skipped")
    run_options.add_argument("--search", default="auto", choices=("auto", "torch", "faiss"),
                             help="retrieval search: chunked torch or faiss (default: faiss on the CPU if installed)")
    run_options.add_argument("--cache-dir", metavar="DIR", help="embedding cache (default: ~/.cache/clipkd/embeddings)")
    run_options.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    run_options.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    run_options.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (CUDA only) (default: fp32)")
    run_options.add_argument("--batch-size", type=_positive_int, default=256, help="default: 256")
    run_options.add_argument("--workers", type=_non_negative_int, default=2, help="image loader processes (default: 2)")
    parser.set_defaults(func=run)
    actions = parser.add_subparsers(dest="action", metavar="compare", required=False)
    compare = actions.add_parser("compare", help="reports side by side as a Markdown table",
                                 description="Print `clipkd eval` reports side by side (Markdown).")
    compare.add_argument("reports", nargs="+", metavar="REPORT.json")
    compare.add_argument("--out", metavar="FILE.md", help="also write the table to this file")
    compare.set_defaults(func=run_compare)


def run(args: argparse.Namespace) -> int:
    import os
    from datetime import datetime, timezone
    from pathlib import Path

    from clipkd_dino.data.faults import format_skipped
    from clipkd_dino.eval.clip_benchmark import (
        benchmark_results,
        retrieval_dataset_name,
        write_benchmark_results,
        zeroshot_dataset_name,
    )
    from clipkd_dino.errors import UserError
    from clipkd_dino.eval.cache import default_cache_dir
    from clipkd_dino.eval.evaluate import evaluate_model
    from clipkd_dino.eval.models import load_eval_model
    from clipkd_dino.eval.retrieval import PROTOCOLS
    from clipkd_dino.eval.search import resolve_backend
    from clipkd_dino.eval.tables import markdown_table
    from clipkd_dino.files import write_json_atomic
    from clipkd_dino.runtime import autocast, resolve_device

    if not (args.retrieval or args.karpathy or args.pairs or args.zeroshot):
        raise UserError("nothing to evaluate: give --retrieval FILE, --karpathy FILE, --pairs SOURCE and/or "
                        "--zeroshot DIR")
    if not args.out:
        raise UserError("--out FILE is required")
    if args.max_bad_fraction is not None and not args.skip_bad:
        raise UserError("--max-bad-fraction needs --skip-bad (without it the first bad sample is an error)")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out is a directory: {out}")
    device = resolve_device(args.device)
    autocast(device, args.precision)  # validates the precision for this device before any work
    search = resolve_backend(args.search, device)
    retrieval, zeroshot = read_data(args)
    loaded = load_eval_model(args.model, args.pretrained, device)
    metrics = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        loaded.transform,
        retrieval=retrieval,
        zeroshot=zeroshot,
        device=device,
        precision=args.precision,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache=None if args.no_cache else Path(args.cache_dir or default_cache_dir()),
        model_name=loaded.name,
        search=search,
        skip_bad=args.skip_bad,
        progress=True,
        max_bad_fraction=args.max_bad_fraction,
    )
    pretrained = args.pretrained
    report = {
        "model": loaded.name,
        "pretrained": os.path.abspath(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "precision": args.precision,
        "search": search,
        **({"protocols": PROTOCOLS} if retrieval else {}),
        **metrics,
    }
    table = markdown_table([report], [loaded.name])
    write_json_atomic(out, report)
    _write_text(out.with_suffix(".md"), table)
    print(table)
    if args.skip_bad:
        for part in ("retrieval", "zeroshot"):
            if part in metrics:
                print(f"{part}: {format_skipped(metrics[part]['skipped'])}")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if args.clip_benchmark:
        results = benchmark_results(report, retrieval_dataset_name(args.karpathy, args.pairs or args.retrieval),
                                    zeroshot_dataset_name(args.zeroshot, len(zeroshot.classnames) if zeroshot else 0))
        for path in write_benchmark_results(results, args.clip_benchmark):
            print(f"wrote {path}")
    return 0


def read_data(args: argparse.Namespace):
    """(retrieval set or None, zero-shot set or None) from the options, missing images checked (or dropped)."""
    from clipkd_dino.errors import UserError
    from clipkd_dino.eval.retrieval import read_retrieval_file
    from clipkd_dino.eval.sources import check_images, read_karpathy, read_pairs
    from clipkd_dino.eval.zeroshot import read_zeroshot

    if args.karpathy and not args.images:
        raise UserError("--karpathy needs --images ROOT (images are ROOT/filepath/filename)")
    skip_bad = args.skip_bad
    if args.karpathy:
        retrieval = read_karpathy(args.karpathy, args.images, args.split, skip_bad)
    elif args.pairs:
        retrieval = read_pairs(args.pairs, args.format, args.csv_separator, args.csv_img_key, args.csv_caption_key,
                               skip_bad)
    elif args.retrieval:
        retrieval = read_retrieval_file(args.retrieval, check_images=not skip_bad, skip_bad=skip_bad)
    else:
        retrieval = None
    zeroshot = (read_zeroshot(args.zeroshot, args.classnames, args.templates, check_images=not skip_bad)
                if args.zeroshot else None)
    return tuple(check_images(data, args.skip_bad) if data else None for data in (retrieval, zeroshot))


def run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipkd_dino.eval.tables import compare_reports

    table = compare_reports(args.reports)
    print(table)
    if args.out:
        _write_text(Path(args.out), table)
    return 0


def _write_text(path, text: str) -> None:
    from clipkd_dino.files import write_atomic

    write_atomic(path, lambda stream: stream.write(f"{text}\n".encode("utf-8")))


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
