"""`clipkd cls centers CONFIG` and `clipkd cls train CONFIG`: the classification mode (CNN teacher/student pairs)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Knowledge distillation for CNN pairs (CIFAR-100, ImageNet, scikit-learn digits, toyworld) with KD, DKD, ReviewKD
and their KD++ variants (the same method with distill.dino_weight > 0).

  clipkd cls centers CONFIG [key=value ...]   the teacher's class means of its pooled features (needed by ++)
  clipkd cls train CONFIG [key=value ...]     train the student (single process or torchrun)

Configs for every published row: configs/cls/ (README there).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cls", help="classification mode: KD, DKD, ReviewKD (+ dino) for CNN pairs",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    centers = actions.add_parser("centers", help="the teacher's class means over the training set")
    train = actions.add_parser("train", help="train a CNN student (SGD, step schedule)")
    for sub in (centers, train):
        sub.add_argument("config", help="YAML config file (see configs/cls/)")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
        sub.add_argument("--max-bad-fraction", type=float, metavar="F",
                         help="stop once more than this fraction of the images read were bad (sets the config key "
                              "data.max_bad_fraction)")
    train.add_argument("--resume", metavar="latest|auto|PATH",
                       help="continue from OUTPUT_DIR/checkpoints/latest.pt ('latest'; 'auto': when it exists, else "
                            "start fresh, for torchrun --max-restarts) or a checkpoint file")
    centers.set_defaults(func=run_centers)
    train.set_defaults(func=run_train)


def run_centers(args: argparse.Namespace) -> int:
    from clipkd_dino.classify.centers import compute_centers
    from clipkd_dino.data.faults import format_skipped
    from clipkd_dino.classify.config import load_cls_config
    from clipkd_dino.config import with_bad_fraction

    summary = compute_centers(load_cls_config(args.config, with_bad_fraction(args)))
    print(f"class means of {summary['teacher']} over {summary['images']} images "
          f"(teacher train top-1 {summary['teacher_train_top1']:.2f}%); {format_skipped(summary['skipped'])} -> "
          f"{summary['out']}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import os

    from clipkd_dino.classify.config import load_cls_config
    from clipkd_dino.config import with_bad_fraction
    from clipkd_dino.classify.trainer import train_classifier
    from clipkd_dino.data.faults import format_skipped

    summary = train_classifier(load_cls_config(args.config, with_bad_fraction(args)), resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        target = summary["published_top1"]
        print(f"{summary['method']} {summary['student']} <- {summary['teacher']}: best top-1 "
              f"{summary['best_top1']:.2f}%" + (f" (published {target:.2f}%)" if target is not None else "")
              + f", {summary['wall_seconds']:.0f} s; {format_skipped(summary['skipped_samples'])} -> "
              f"{summary['checkpoint']}")
    return 0
