"""`clipkd demo`: the main job on the embedded toyworld data, from nothing to a results table.

1. generate toyworld (40k train / 2k val images) unless it is already there;
2. take the shipped toy teacher (assets/toy_teacher.pt) or, with --retrain-teacher, train it from scratch;
3. evaluate the teacher, train a toy student without a teacher (the baseline), evaluate it;
4. print a table and write OUT/summary.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TEACHER = REPO / "assets" / "toy_teacher.pt"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the main job on the embedded toyworld data",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/toyworld", help="toyworld folder (generated when missing)")
    parser.add_argument("--out", default="runs/demo", help="where runs, metrics and the summary go")
    parser.add_argument("--retrain-teacher", action="store_true", help="train the toy teacher instead of "
                        "using the shipped checkpoint (about 32 minutes on 2 cores)")
    parser.add_argument("--student-epochs", type=int, default=3, help="epochs of the baseline student")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.set_defaults(func=run)


def toyworld_overrides(data: Path) -> list[str]:
    return [f"data.train={data / 'train' / 'shards'}", f"data.val_retrieval={data / 'val' / 'retrieval.jsonl'}",
            f"data.val_zeroshot={data / 'val' / 'zeroshot'}"]


def run(args: argparse.Namespace) -> int:
    from clipkd_dino.config import load_config
    from clipkd_dino.data.toyworld import generate
    from clipkd_dino.eval.evaluate import evaluate_model
    from clipkd_dino.files import write_json_atomic
    from clipkd_dino.models import create_model, get_tokenizer, image_transforms
    from clipkd_dino.report import format_metrics, plot_eval_curves
    from clipkd_dino.train.trainer import train

    data, out = Path(args.data), Path(args.out)
    if not (data / "toyworld.json").is_file():
        print(f"[demo] generating toyworld in {data}")
        generate(data, n_train=40000, n_val=2000, image_size=64, seed=0, workers=2)
    common = [*toyworld_overrides(data), f"train.device={args.device}"]
    rows = []

    if args.retrain_teacher or not SHIPPED_TEACHER.is_file():
        print("[demo] training the toy teacher")
        summary = train(load_config(REPO / "configs" / "toy_teacher.yaml",
                                    [*common, f"train.output_dir={out / 'teacher'}"]))
        teacher_checkpoint, teacher_metrics, teacher_time = summary["checkpoint"], summary["metrics"], \
            summary["wall_seconds"]
    else:
        print(f"[demo] evaluating the shipped toy teacher {SHIPPED_TEACHER.relative_to(REPO)}")
        teacher = create_model("toy-teacher", str(SHIPPED_TEACHER))
        teacher_checkpoint, teacher_time = str(SHIPPED_TEACHER), None
        teacher_metrics = evaluate_model(teacher, get_tokenizer("toy-teacher"), image_transforms(teacher)[1],
                                         retrieval=str(data / "val" / "retrieval.jsonl"),
                                         zeroshot=str(data / "val" / "zeroshot"), num_workers=1)
    rows.append(("teacher toy-teacher", teacher_checkpoint, teacher_time, teacher_metrics))
    print(format_metrics(teacher_metrics))

    print(f"[demo] training the baseline student (no teacher), {args.student_epochs} epochs")
    summary = train(load_config(REPO / "configs" / "toy_student.yaml",
                                [*common, f"train.output_dir={out / 'student_baseline'}",
                                 f"train.epochs={args.student_epochs}"]))
    rows.append(("student toy-student, no teacher", summary["checkpoint"], summary["wall_seconds"],
                 summary["metrics"]))

    table = format_demo_table(rows)
    print("\n" + table)
    write_json_atomic(out / "summary.json", [
        {"run": name, "checkpoint": ckpt, "train_seconds": seconds, "metrics": metrics}
        for name, ckpt, seconds, metrics in rows])
    curves = {name: Path(ckpt).parents[1] / "metrics.jsonl" for name, ckpt, _, _ in rows}
    curves = {name: path for name, path in curves.items() if path.is_file()}
    plot = plot_eval_curves(curves, out / "curves.png")
    print(f"\n[demo] metrics in {out / 'summary.json'}, curves in {plot}; "
          f"TensorBoard: tensorboard --logdir {out}")
    return 0


def format_demo_table(rows: list[tuple]) -> str:
    header = (f"{'run':<34} {'train s':>8} {'i2t R@1':>8} {'t2i R@1':>8} {'zero-shot top-1':>16}"
              "   (toyworld val; retrieval protocol any_caption; zero-shot on single-object images)")
    lines = [header]
    for name, _, seconds, metrics in rows:
        retrieval, zeroshot = metrics["retrieval"]["any_caption"], metrics["zeroshot"]
        shown = f"{seconds:8.0f}" if seconds is not None else f"{'shipped':>8}"
        lines.append(f"{name:<34} {shown} {retrieval['i2t_R@1']:8.2f} {retrieval['t2i_R@1']:8.2f} "
                     f"{zeroshot['top1']:16.2f}")
    return "\n".join(lines)
