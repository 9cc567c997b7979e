"""`clipkd label` (the labelling pass) and `clipkd label stats DIR` (what the labels look like)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
The frozen teacher labels every training image with its nearest concept of a pool (cosine of the image's embedding,
on the evaluation view, to each concept's prompt-ensemble text embedding), forms the class means of its unnormalised
image and caption embeddings and, with --cache-views K, stores its embeddings of K replayable augmentation views and
of every caption so that training never runs the teacher. Works under torchrun (each rank labels its share) and
resumes a killed run (finished shards are kept).

  clipkd label --teacher NAME --teacher-pretrained PATH --concepts POOL.json --data SOURCE --out DIR [options]
  clipkd label stats DIR        label histogram, score and margin distributions, precision against ground truth
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("label", help="teacher pseudo-labels, class means and embedding cache",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", metavar="NAME", help="teacher architecture (open_clip name or a shipped config)")
    parser.add_argument("--teacher-pretrained", metavar="PATH", help="teacher checkpoint file")
    parser.add_argument("--concepts", metavar="POOL.json", help="concept pool (`clipkd concepts build`)")
    parser.add_argument("--data", metavar="SOURCE",
                        help="what `clipkd train` takes: a CSV file, shards, brace patterns, '::', a folder of shards")
    parser.add_argument("--out", metavar="DIR", help="output folder")
    parser.add_argument("--top-k", type=int, metavar="K", help="use the pool's top K concepts (default: all)")
    parser.add_argument("--templates", metavar="FILE",
                        help="prompt templates: a JSON list, or a file like concepts/prompts.json (the default)")
    parser.add_argument("--min-score", type=float, metavar="X", help="no label below this cosine")
    parser.add_argument("--min-margin", type=float, metavar="X", help="no label when the lead over the runner-up "
                        "concept is below X")
    parser.add_argument("--min-images", type=int, default=0, metavar="N",
                        help="drop concepts with fewer than N images (classes are renumbered densely)")
    parser.add_argument("--cache-views", type=int, default=0, metavar="K",
                        help="cache the teacher's embeddings of K augmentation views per image (default: 0, none)")
    parser.add_argument("--cache-dtype", default="fp16", choices=("fp16", "bf16"), help="default: fp16")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=[0.9, 1.0], metavar=("LOW", "HIGH"),
                        help="area range of the cached views' random crops (default: 0.9 1.0, as training)")
    parser.add_argument("--hflip", type=float, default=0.0, metavar="P",
                        help="probability of a horizontal flip in the cached views (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cached views (default: 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="default: 256")
    parser.add_argument("--workers", type=int, default=2, help="image loader processes (default: 2)")
    parser.add_argument("--worker-timeout", type=float, metavar="SECONDS",
                        help="stop with an error when the loader workers deliver no batch for this long (default: "
                             "data/loader.py's DEFAULT_TIMEOUT, 600; 0: wait for ever)")
    parser.add_argument("--parts-timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="under torchrun: stop with an error when rank 0 sees no new part from the other ranks "
                             "for this long (default: 3600)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16, fp16 (CUDA) (default: fp32)")
    parser.add_argument("--search", default="torch", choices=("torch", "faiss"),
                        help="nearest-concept search (both give the same labels; default: torch)")
    parser.add_argument("--data-format", default="auto", choices=("auto", "csv", "webdataset"))
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--max-bad-fraction", type=float, metavar="F",
                        help="stop once more than this fraction of the samples seen were bad (missing, empty or "
                             "corrupt images, samples without a caption, broken shards; default: never)")
    parser.set_defaults(func=run)
    commands = parser.add_subparsers(dest="label_command", metavar="stats", required=False)
    stats = commands.add_parser("stats", help="histogram, distributions, precision against ground truth, a plot")
    stats.add_argument("dir", metavar="DIR", help="output folder of `clipkd label`")
    stats.add_argument("--plot", metavar="PNG", help="where to write the plot (default: DIR/stats.png)")
    stats.set_defaults(func=run_stats)


def run(args: argparse.Namespace) -> int:
    from clipkd_dino.data.faults import format_skipped
    from clipkd_dino.data.loader import DEFAULT_TIMEOUT
    from clipkd_dino.errors import UserError
    from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset

    for flag in ("teacher", "concepts", "data", "out"):
        if getattr(args, flag) is None:
            raise UserError(f"--{flag} is required (or `clipkd label stats DIR`)")
    settings = LabelSettings(
        teacher=args.teacher, teacher_pretrained=args.teacher_pretrained, concepts=args.concepts, data=args.data,
        out=args.out, top_k=args.top_k, templates=args.templates, min_score=args.min_score,
        min_margin=args.min_margin, min_images=args.min_images, cache_views=args.cache_views,
        cache_dtype=args.cache_dtype, crop_scale=list(args.crop_scale), hflip=args.hflip, seed=args.seed,
        batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
        search=args.search, data_format=args.data_format, csv_separator=args.csv_separator,
        csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key, max_bad_fraction=args.max_bad_fraction,
        worker_timeout=DEFAULT_TIMEOUT if args.worker_timeout is None else args.worker_timeout,
        parts_timeout=args.parts_timeout)
    summary = label_dataset(settings)
    if summary:
        print(f"labelled {summary['labelled']} of {summary['samples']} images into {summary['classes']} classes "
              f"({summary['images_per_second']} images/s); {format_skipped(summary['skipped'])}; "
              f"outputs in {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipkd_dino.teacher.stats import format_stats, label_stats, plot_stats

    stats = label_stats(args.dir)
    plot = plot_stats(args.dir, Path(args.plot) if args.plot else Path(args.dir) / "stats.png")
    print(format_stats(stats))
    print(f"plot: {plot}; JSON: {Path(args.dir) / 'stats.json'}")
    return 0
