"""`clipkd demo`: the whole method on the embedded toyworld data, from captions to a report, nothing downloaded.

1. generate toyworld unless it is already there;
2. build a concept pool from the training captions (`clipkd concepts build --phrases --top-k 16`);
3. take the shipped toy teacher (assets/toy_teacher.pt) or, with --retrain-teacher, train it;
4. the labelling pass: pseudo-labels, class means and a 2-view teacher-embedding cache over the students' shards;
5. per seed, three students on the same data and steps: no teacher; CLIP-KD (task + CRD + ICL + FD); CLIP-KD +
   dino-loss (both from the cache: no teacher forward while training);
6. evaluate all four, measure feature norms and alignment with class-mean directions, write OUT/report.md, plots
   and OUT/summary.json.

`--smoke` runs every stage on tiny data (a first look, and CI).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from clipkd_dino.report import mean_sd

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TEACHER = REPO / "assets" / "toy_teacher.pt"


@dataclass(frozen=True)
class Scale:
    n_train: int
    n_val: int
    shard_size: int
    student_shards: int  # the students train, and the labelling pass runs, on the first N train shards
    pool_shards: int  # the concept pool is built from the captions of the first N train shards
    epochs: int
    batch_size: int
    warmup_steps: int


FULL = Scale(n_train=40000, n_val=2000, shard_size=1000, student_shards=16, pool_shards=4, epochs=2, batch_size=128,
             warmup_steps=100)
SMOKE = Scale(n_train=1200, n_val=200, shard_size=200, student_shards=4, pool_shards=6, epochs=1, batch_size=64,
              warmup_steps=3)
STUDENTS = {  # name -> overrides of configs/toy_distill.yaml
    "no teacher": ["distill.teacher=null"],
    "CLIP-KD": ["distill.weights.dino=0"],
    "CLIP-KD + dino": [],
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the whole method on the embedded toyworld data",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="toyworld folder, generated when missing (default: data/toyworld, "
                                       "data/toyworld_smoke with --smoke)")
    parser.add_argument("--out", help="where runs, labels, plots and the report go (default: runs/demo, "
                                      "runs/demo_cls with --cls)")
    parser.add_argument("--cls", action="store_true", help="the classification mode instead: a CNN teacher, its "
                        "class means and KD / KD++ students on scikit-learn's digits (clipkd_dino/cls/demo.py)")
    parser.add_argument("--smoke", action="store_true", help="every stage on tiny data (about 2 minutes)")
    parser.add_argument("--seeds", type=int, help="students per variant, mean and sd reported (default: 1; 3 with "
                                                    "--cls)")
    parser.add_argument("--min-margin", type=float, help="labelling: no pseudo-label below this margin (a "
                                                         "label-quality lever; see `clipkd label stats`)")
    parser.add_argument("--dino-weight", type=float, default=1.0, help="weight of the dino-loss (default: 1)")
    parser.add_argument("--epochs", type=int, help="student epochs (default: 2, 1 with --smoke)")
    parser.add_argument("--retrain-teacher", action="store_true", help="train the toy teacher instead of "
                        "using the shipped checkpoint (about 32 minutes on 2 cores)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.set_defaults(func=run)


def toyworld_overrides(data: Path) -> list[str]:
    return [f"data.train={data / 'train' / 'shards'}", f"data.val_retrieval={data / 'val' / 'retrieval.jsonl'}",
            f"data.val_zeroshot={data / 'val' / 'zeroshot'}"]


def student_shards(data: Path, count: int) -> str:
    return str(data / "train" / "shards" / f"train-{{000000..{count - 1:06d}}}.tar")


# ----------------------------------------------------------------------------------------------------- stages
def make_data(data: Path, scale: Scale) -> None:
    from clipkd_dino.data.toyworld import generate

    if not (data / "toyworld.json").is_file():
        print(f"[demo] generating toyworld in {data}")
        generate(data, n_train=scale.n_train, n_val=scale.n_val, image_size=64, seed=0, workers=2,
                 shard_size=scale.shard_size)


def make_pool(data: Path, scale: Scale, out: Path) -> Path:
    """`clipkd concepts build SHARDS --phrases --top-k 16` over the first training shards."""
    from clipkd_dino.concepts.build import BuildOptions, build_pool

    path = out / "pool.json"
    print(f"[demo] building the concept pool from {scale.pool_shards} training shards")
    build_pool([student_shards(data, scale.pool_shards)], BuildOptions(phrases=True, top_k=16)).save(path)
    return path


def get_teacher(args: argparse.Namespace, data: Path, out: Path) -> tuple[str, float | None]:
    from clipkd_dino.config import load_config
    from clipkd_dino.train.trainer import train

    if not args.retrain_teacher and SHIPPED_TEACHER.is_file():
        return str(SHIPPED_TEACHER), None
    print("[demo] training the toy teacher")
    summary = train(load_config(REPO / "configs" / "toy_teacher.yaml",
                                [*toyworld_overrides(data), f"train.device={args.device}",
                                 f"train.output_dir={out / 'teacher'}"]))
    return summary["checkpoint"], summary["wall_seconds"]


def label(teacher: str, pool: Path, data: Path, scale: Scale, out: Path, args: argparse.Namespace) -> Path:
    from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset

    print("[demo] labelling pass: pseudo-labels, class means, a 2-view teacher-embedding cache")
    label_dataset(LabelSettings(
        teacher="toy-teacher", teacher_pretrained=teacher, concepts=str(pool), top_k=16,
        data=student_shards(data, scale.student_shards), out=str(out / "labels"),
        templates=str(data / "val" / "zeroshot" / "templates.json"), min_margin=args.min_margin, cache_views=2,
        crop_scale=[0.8, 1.0], device=args.device, workers=2))
    return out / "labels"


def train_students(data: Path, scale: Scale, labels: Path, out: Path, args: argparse.Namespace) -> list[dict]:
    from clipkd_dino.config import load_config
    from clipkd_dino.train.trainer import train

    runs = []
    for seed in range(args.seeds):
        for name, overrides in STUDENTS.items():
            run_dir = out / "students" / f"{name.replace(' ', '').replace('+', '_').lower()}_seed{seed}"
            print(f"[demo] student '{name}', seed {seed}")
            summary = train(load_config(REPO / "configs" / "toy_distill.yaml", [
                *toyworld_overrides(data), f"data.train={student_shards(data, scale.student_shards)}",
                f"distill.cache={labels}", f"distill.labels={labels}",
                f"distill.weights.dino={args.dino_weight}", f"train.epochs={args.epochs or scale.epochs}",
                f"train.batch_size={scale.batch_size}", f"optim.warmup_steps={scale.warmup_steps}",
                f"train.log_every_steps={min(20, scale.warmup_steps * 2)}", f"train.seed={seed}",
                f"train.device={args.device}",
                f"train.output_dir={run_dir}", *overrides]))
            runs.append({"name": name, "seed": seed, "dir": str(run_dir), "summary": summary})
    return runs


# ----------------------------------------------------------------------------------------------------- analysis
def analyse(teacher_checkpoint: str, labels_dir: Path, data: Path, runs: list[dict], device: str) -> dict:
    """Teacher and student features of the val images: norms, and alignment with the class-mean directions.

    Val images get the teacher's nearest concept as label (the same rule as the labelling pass). Each model's
    alignment is the mean cosine of its features to its own class-mean direction; the dino student's projected
    features are also measured against the teacher's class means (what its dino-loss optimises).
    """
    import torch

    from clipkd_dino.eval.encode import encode_images
    from clipkd_dino.eval.geometry import class_mean_cosine
    from clipkd_dino.eval.retrieval import read_retrieval_file
    from clipkd_dino.eval.zeroshot import zeroshot_classifier
    from clipkd_dino.models import create_model, get_tokenizer, image_transforms
    from clipkd_dino.runtime import resolve_device
    from clipkd_dino.teacher import load_labels
    from clipkd_dino.teacher.label_pass import read_templates
    from clipkd_dino.teacher.search import nearest_concepts
    from clipkd_dino.train.checkpoint import load_checkpoint

    device = resolve_device(device)
    images = read_retrieval_file(data / "val" / "retrieval.jsonl").images
    labels = load_labels(labels_dir)
    teacher = create_model("toy-teacher", teacher_checkpoint, device)
    transform = image_transforms(teacher, augment=False)[1]
    t_features = encode_images(teacher, images, transform, device, num_workers=1)
    concepts = zeroshot_classifier(teacher, get_tokenizer("toy-teacher"), labels.concepts,
                                   read_templates(str(data / "val" / "zeroshot" / "templates.json")), device).T
    val_labels = nearest_concepts(torch.nn.functional.normalize(t_features, dim=-1), concepts).concept
    result = {"teacher": {"norms": t_features.norm(dim=-1),
                          "cosine_own": class_mean_cosine(t_features, val_labels)}}
    for run in runs:
        student = create_model("toy-student", run["summary"]["checkpoint"], device)
        features = encode_images(student, images, transform, device, num_workers=1)
        entry = {"norms": features.norm(dim=-1), "cosine_own": class_mean_cosine(features, val_labels)}
        objective = load_checkpoint(Path(run["dir"]) / "checkpoints" / "latest.pt")["objective"]
        if "dino_projector.2.weight" in objective:
            projector = _dino_projector(objective).to(device).eval()
            with torch.no_grad():
                projected = projector(features.to(device)).cpu()
            entry |= {"projected_norms": projected.norm(dim=-1),
                      "cosine_teacher_means": class_mean_cosine(projected, val_labels, labels.class_means)}
        result[f"{run['name']}#{run['seed']}"] = entry
    return result


def _dino_projector(objective: dict):
    """The trained dino projector of a distiller's saved state (`latest.pt`'s "objective")."""
    from clipkd_dino.distill.distiller import dino_projector

    weight = objective["dino_projector.2.weight"]
    projector = dino_projector(weight.shape[1], weight.shape[0])
    projector.load_state_dict({k.removeprefix("dino_projector."): v for k, v in objective.items()
                               if k.startswith("dino_projector.")})
    return projector


# ----------------------------------------------------------------------------------------------------- report
METRICS = (("any_caption", "i2t_R@1"), ("any_caption", "i2t_R@5"), ("any_caption", "t2i_R@1"),
           ("any_caption", "t2i_R@5"), ("one_to_one", "i2t_R@1"), ("one_to_one", "t2i_R@1"))


def comparison_table(teacher_metrics: dict, runs: list[dict]) -> str:
    header = ["model", "runs", "train s"] + [f"{m} {p}" for p, m in METRICS] + ["zero-shot top-1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(name: str, metrics: list[dict], seconds: list[float] | None) -> str:
        cells = [mean_sd([m["retrieval"][p][k] for m in metrics]) for p, k in METRICS]
        cells.append(mean_sd([m["zeroshot"]["top1"] for m in metrics]))
        shown = mean_sd(seconds).split(".")[0] if seconds else "shipped"
        return f"| {name} | {len(metrics)} | {shown} | " + " | ".join(cells) + " |"

    lines.append(row("teacher (toy-teacher)", [teacher_metrics], None))
    for name in STUDENTS:
        mine = [r for r in runs if r["name"] == name]
        lines.append(row(f"student: {name}", [r["summary"]["metrics"] for r in mine],
                         [r["summary"]["wall_seconds"] for r in mine]))
    return "\n".join(lines)


def geometry_table(geometry: dict) -> str:
    lines = ["| model | mean ‖f‖ | cosine to own class-mean direction | dino-projected: mean ‖f‖ | "
             "dino-projected: cosine to the teacher's class-mean direction |", "|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for name, entry in geometry.items():
        groups.setdefault(name.split("#")[0], []).append(entry)
    for name, entries in groups.items():
        cells = [mean_sd([float(e["norms"].mean()) for e in entries]),
                 mean_sd([e["cosine_own"] for e in entries])]
        if "projected_norms" in entries[0]:
            cells += [mean_sd([float(e["projected_norms"].mean()) for e in entries]),
                      mean_sd([e["cosine_teacher_means"] for e in entries])]
        else:
            cells += ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_norms(geometry: dict, path: Path) -> Path:
    """Histograms of feature norms (the paper's Figure 2): teacher, each student (seed 0), the dino projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipkd_dino.files import write_atomic

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, entry in geometry.items():
        if name == "teacher" or name.endswith("#0"):
            label = name.removesuffix("#0")
            axis.hist(entry["norms"].tolist(), bins=50, alpha=0.45, label=label)
            if "projected_norms" in entry:
                axis.hist(entry["projected_norms"].tolist(), bins=50, alpha=0.45, label=f"{label} (dino projector)")
    axis.set_xlabel("feature norm ‖f‖ (unnormalised image embedding, toyworld val)")
    axis.set_ylabel("images")
    axis.legend(fontsize=8)
    figure.tight_layout()
    write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=110))
    plt.close(figure)
    return path


def write_report(out: Path, context: dict) -> Path:
    stats, truth = context["label_stats"], context["label_stats"].get("ground_truth", {})
    seeds = context["seeds"]
    noise = ("" if seeds > 1 else "\nOne seed per student: differences smaller than the seed spread of a multi-seed "
             "run (`clipkd demo --seeds 3`, recorded in docs/benchmarks.md) are noise.\n")
    coverage_rows = "\n".join(f"| {100 * p['coverage']:.0f}% | {p['min_margin']:.4f} | {p['precision']:.1f}% |"
                              for p in truth.get("precision_vs_coverage", []))
    text = f"""# clipkd demo report

Data: toyworld ({context['scale']}), students trained on {context['student_images']} images for
{context['epochs']} epoch(s), {seeds} seed(s) per student; evaluated on {context['val_images']} val images
(retrieval: 5 captions each; zero-shot: the single-object images, 16 kinds). Wall time {context['seconds']:.0f} s.

## Results (Recall@K and top-1 in %; mean ± sd over seeds)
{noise}
{context['comparison']}

Protocols: `any_caption` counts an image query right at K when any of its captions is in its top K (COCO/Flickr
Karpathy style); `one_to_one` keeps each image's first caption only (as the public CLIP-KD code does).

## Pseudo-labels (teacher's nearest concept among the pool's top 16)

Concept pool built from the training captions: {', '.join(context['pool'])}.

{stats['labelled']} of {stats['samples']} training images labelled ({stats['coverage']:.1f}% coverage) into
{stats['classes']} classes. Against toyworld's ground truth: labels right on
{truth.get('precision_labelled', float('nan')):.1f}% of labelled images (single-object
{truth.get('precision_labelled_single_object') or float('nan'):.1f}%, multi-object
{truth.get('precision_labelled_multi_object') or float('nan'):.1f}%; a multi-object label is right when it names one
of the objects). Keeping only the images of highest margin trades coverage for precision (`--min-margin`):

| coverage | min margin | precision |
|---|---|---|
{coverage_rows}

![label stats](labels/stats.png)

## Feature geometry (toyworld val images; labels: the teacher's nearest concept)

{context['geometry']}

The dino-loss pulls the student's (projected) feature toward its class-mean direction and its norm up to at least
the teacher's: its effect shows in the last two columns.

![feature norms](norms.png)

## Training curves

![curves](curves.png)

Outputs: `summary.json` (every number above), `students/*/` (checkpoints, `metrics.jsonl`, TensorBoard logs),
`labels/` (pseudo-labels, class means, cache).
"""
    path = out / "report.md"
    from clipkd_dino.files import write_atomic

    write_atomic(path, lambda stream: stream.write(text.encode()))
    return path


# ----------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    from clipkd_dino.concepts.pool import ConceptPool
    from clipkd_dino.errors import UserError
    from clipkd_dino.eval.evaluate import evaluate_model
    from clipkd_dino.files import write_json_atomic
    from clipkd_dino.models import create_model, get_tokenizer, image_transforms
    from clipkd_dino.report import format_metrics, plot_eval_curves
    from clipkd_dino.teacher.stats import format_stats, label_stats, plot_stats

    if args.seeds is not None and args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if args.cls:
        from clipkd_dino.cls.demo import run_cls_demo

        run_cls_demo(Path(args.out or "runs/demo_cls"), args.seeds or 3, args.smoke, args.device)
        return 0
    args.seeds = args.seeds or 1
    start = time.time()
    scale = SMOKE if args.smoke else FULL
    data = Path(args.data or ("data/toyworld_smoke" if args.smoke else "data/toyworld"))
    out = Path(args.out or "runs/demo")
    make_data(data, scale)
    pool = make_pool(data, scale, out)
    teacher, _ = get_teacher(args, data, out)
    model = create_model("toy-teacher", teacher)
    teacher_metrics = evaluate_model(model, get_tokenizer("toy-teacher"), image_transforms(model)[1],
                                     retrieval=str(data / "val" / "retrieval.jsonl"),
                                     zeroshot=str(data / "val" / "zeroshot"), num_workers=1)
    print(format_metrics(teacher_metrics))
    labels = label(teacher, pool, data, scale, out, args)
    stats = label_stats(labels)
    plot_stats(labels, labels / "stats.png")
    print(format_stats(stats))
    runs = train_students(data, scale, labels, out, args)
    geometry = analyse(teacher, labels, data, runs, args.device)
    curves = {f"{r['name']} (seed {r['seed']})": Path(r["dir"]) / "metrics.jsonl" for r in runs}
    plot_eval_curves(curves, out / "curves.png")
    plot_norms(geometry, out / "norms.png")
    comparison = comparison_table(teacher_metrics, runs)
    context = {
        "scale": "smoke" if args.smoke else "full", "student_images": scale.student_shards * scale.shard_size,
        "epochs": args.epochs or scale.epochs, "seeds": args.seeds,
        "val_images": teacher_metrics["retrieval"]["num_images"], "seconds": time.time() - start,
        "comparison": comparison, "geometry": geometry_table(geometry), "label_stats": stats,
        "pool": ConceptPool.load(pool).names(),
    }
    report = write_report(out, context)
    write_json_atomic(out / "summary.json", {
        "teacher": {"checkpoint": teacher, "metrics": teacher_metrics},
        "students": [{"name": r["name"], "seed": r["seed"], "dir": r["dir"], "train_seconds":
                      r["summary"]["wall_seconds"], "metrics": r["summary"]["metrics"]} for r in runs],
        "labels": stats, "pool": context["pool"], "seconds": round(context["seconds"], 1),
        "geometry": {name: {k: (float(v.mean()) if hasattr(v, "mean") else v) for k, v in entry.items()}
                     for name, entry in geometry.items()},
    })
    print("\n" + comparison)
    print(f"\n[demo] report: {report}; TensorBoard: tensorboard --logdir {out}")
    return 0
