"""`clipkd demo`: the whole method on the embedded toyworld data, from captions to a report, nothing downloaded.

1. generate toyworld unless it is already there;
2. build a concept pool from the training captions (`clipkd concepts build --phrases --top-k 16`);
3. take the shipped toy teacher (assets/toy_teacher.pt) or, with --retrain-teacher, train it;
4. the labelling pass: pseudo-labels, class means and a 2-view teacher-embedding cache over the students' shards;
5. per seed, three students on the same data and steps: no teacher; CLIP-KD (task + CRD + ICL + FD); CLIP-KD +
   dino-loss (both from the cache: no teacher forward while training). The default student, toy-student-96, has
   the teacher's embedding dim (as ViT-T/16 has ViT-B/16's 512): FD and the dino-loss act on its own embedding;
   `--student toy-student` (64-dim) shows the projector case;
6. evaluate all four, measure feature norms and alignment with class-mean directions, write OUT/report.md (with the
   paired differences dino minus CLIP-KD, seed by seed, and their 95% t-interval), plots (loss terms per step,
   evaluations, feature norms) and OUT/summary.json.

`--smoke` runs every stage on tiny data (a first look, and CI).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipkd_dino.report import mean_sd, paired_summary, paired_table, paired_words
from clipkd_dino.shipped import ASSETS, CONFIGS

if TYPE_CHECKING:
    import torch

SHIPPED_TEACHER = ASSETS / "toy_teacher.pt"
DEFAULT_STUDENT = "toy-student-96"


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
                        "class means and KD / KD++ students on scikit-learn's digits (clipkd_dino/classify/demo.py)")
    parser.add_argument("--smoke", action="store_true", help="every stage on tiny data (about 2 minutes)")
    parser.add_argument("--seeds", type=int, help="students per variant, mean and sd reported (default: 1; 3 with "
                                                    "--cls)")
    parser.add_argument("--min-margin", type=float, help="labelling: no pseudo-label below this margin (a "
                                                         "label-quality lever; see `clipkd label stats`)")
    parser.add_argument("--dino-weight", type=float, default=1.0, help="weight of the dino-loss (default: 1)")
    parser.add_argument("--student", default=DEFAULT_STUDENT, help="the students' model (default: "
                        f"{DEFAULT_STUDENT}, the teacher's embedding dim, no projectors; toy-student: 64-dim, FD "
                        "and the dino-loss through projectors)")
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
    from clipkd_dino.toyworld.generate import generate

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
    summary = train(load_config(CONFIGS / "toy_teacher.yaml",
                                [*toyworld_overrides(data), f"train.device={args.device}",
                                 f"train.output_dir={out / 'teacher'}"]))
    return summary["checkpoint"], summary["wall_seconds"]


def label(teacher: str, pool: Path, data: Path, scale: Scale, out: Path, min_margin: float | None,
          device: str) -> Path:
    from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset

    print("[demo] labelling pass: pseudo-labels, class means, a 2-view teacher-embedding cache")
    label_dataset(LabelSettings(
        teacher="toy-teacher", teacher_pretrained=teacher, concepts=str(pool), top_k=16,
        data=student_shards(data, scale.student_shards), out=str(out / "labels"),
        templates=str(data / "val" / "zeroshot" / "templates.json"), min_margin=min_margin, cache_views=2,
        crop_scale=[0.8, 1.0], device=device, workers=2))
    return out / "labels"


@dataclass(frozen=True)
class StudentPlan:
    """What every student of a demo shares: the data, the labelling output, the schedule and the model."""
    data: Path
    scale: Scale
    labels: Path
    student: str = DEFAULT_STUDENT
    epochs: int | None = None  # default: the scale's
    dino_weight: float = 1.0
    device: str = "auto"
    teacher: str = str(SHIPPED_TEACHER)  # the checkpoint the labels and cache were made with


def run_name(name: str, seed: int) -> str:
    return f"{name.replace(' ', '').replace('+', '_').lower()}_seed{seed}"


def student_overrides(plan: StudentPlan, name: str, seed: int, run_dir: Path) -> list[str]:
    """The overrides of configs/toy_distill.yaml for student `name` (a key of STUDENTS) at `seed`: the run is
    `clipkd train configs/toy_distill.yaml OVERRIDES...`."""
    scale = plan.scale
    return [*toyworld_overrides(plan.data), f"data.train={student_shards(plan.data, scale.student_shards)}",
            f"model.name={plan.student}", f"distill.teacher_pretrained={plan.teacher}",
            f"distill.cache={plan.labels}", f"distill.labels={plan.labels}",
            f"distill.weights.dino={plan.dino_weight}", f"train.epochs={plan.epochs or scale.epochs}",
            f"train.batch_size={scale.batch_size}", f"optim.warmup_steps={scale.warmup_steps}",
            f"train.log_every_steps={min(20, scale.warmup_steps * 2)}", f"train.seed={seed}",
            f"train.device={plan.device}", f"train.output_dir={run_dir}", *STUDENTS[name]]


def train_students(plan: StudentPlan, out: Path, seeds: range, names: tuple[str, ...] = tuple(STUDENTS)
                   ) -> list[dict]:
    """Per seed, each student of `names` into OUT/students/NAME_seedK; a record per run."""
    from clipkd_dino.config import load_config
    from clipkd_dino.train.trainer import train

    runs = []
    for seed in seeds:
        for name in names:
            run_dir = out / "students" / run_name(name, seed)
            print(f"[demo] student '{name}' ({plan.student}), seed {seed}")
            overrides = student_overrides(plan, name, seed, run_dir)
            summary = train(load_config(CONFIGS / "toy_distill.yaml", overrides))
            runs.append({"name": name, "seed": seed, "dir": str(run_dir), "model": plan.student,
                         "summary": summary})
    return runs


# ----------------------------------------------------------------------------------------------------- analysis
def analyse(teacher_checkpoint: str, labels_dir: Path, data: Path, runs: list[dict], device: str) -> dict:
    """Teacher and student features of the val images: norms, and alignment with the class-mean directions.

    Val images get the teacher's nearest concept as label (the same rule as the labelling pass). Each model's
    alignment is the mean cosine of its features to its own class-mean direction, and to the teacher's class-mean
    direction (what the dino-loss pulls toward): its own features when it has the teacher's dim, else the dino
    student's projected features only.
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
        student = create_model(run["model"], run["summary"]["checkpoint"], device)
        features = encode_images(student, images, transform, device, num_workers=1)
        entry = {"norms": features.norm(dim=-1), "cosine_own": class_mean_cosine(features, val_labels)}
        if features.shape[1] == t_features.shape[1]:  # a dino projector of equal dims is the identity
            entry["cosine_teacher_means"] = class_mean_cosine(features, val_labels, labels.class_means)
        elif (projector := getattr(trained_objective(Path(run["dir"]), student, device), "dino_projector", None)):
            with torch.no_grad():
                projected = projector(features.to(device)).cpu()
            entry |= {"projected_norms": projected.norm(dim=-1),
                      "cosine_teacher_means": class_mean_cosine(projected, val_labels, labels.class_means)}
        result[f"{run['name']}#{run['seed']}"] = entry
    return result


def trained_objective(run_dir: Path, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A training run's objective (`model` with the distiller's projectors) as it ended: rebuilt from the run's
    config.yaml, its state loaded from latest.pt; in eval mode."""
    from clipkd_dino.config import load_config
    from clipkd_dino.distill import build_objective
    from clipkd_dino.engine.checkpoint import load_checkpoint

    objective = build_objective(load_config(run_dir / "config.yaml"), model, device)
    objective.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "latest.pt")["objective"])
    return objective.eval()


# ----------------------------------------------------------------------------------------------------- report
METRICS = (("any_caption", "i2t_R@1"), ("any_caption", "i2t_R@5"), ("any_caption", "t2i_R@1"),
           ("any_caption", "t2i_R@5"), ("one_to_one", "i2t_R@1"), ("one_to_one", "t2i_R@1"))


def metric_values(metrics: dict) -> dict[str, float]:
    """An evaluation's numbers the report compares: label -> value."""
    return {f"{k} {p}": metrics["retrieval"][p][k] for p, k in METRICS} | {"zero-shot top-1":
                                                                         metrics["zeroshot"]["top1"]}


def paired_rows(runs: list[dict], treated: str, control: str) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (treated's values, control's values) over the seeds both students ran, ordered by seed."""
    by_seed = {(r["name"], r["seed"]): metric_values(r["summary"]["metrics"]) for r in runs}
    seeds = sorted(seed for name, seed in by_seed if name == treated and (control, seed) in by_seed)
    return {metric: ([by_seed[treated, s][metric] for s in seeds], [by_seed[control, s][metric] for s in seeds])
            for metric in by_seed[treated, seeds[0]]} if seeds else {}


def comparison_table(teacher_metrics: dict | None, runs: list[dict]) -> str:
    """Mean ± sd per student name (in the runs' order), after the teacher's row when its metrics are given."""
    header = ["model", "runs", "train s"] + [f"{m} {p}" for p, m in METRICS] + ["zero-shot top-1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(name: str, metrics: list[dict], seconds: list[float] | None) -> str:
        values = [metric_values(m) for m in metrics]
        cells = [mean_sd([v[label] for v in values]) for label in values[0]]
        shown = mean_sd(seconds).split(".")[0] if seconds else "shipped"
        return f"| {name} | {len(metrics)} | {shown} | " + " | ".join(cells) + " |"

    if teacher_metrics:
        lines.append(row("teacher (toy-teacher)", [teacher_metrics], None))
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        lines.append(row(f"student: {name}", [r["summary"]["metrics"] for r in mine],
                         [r["summary"]["wall_seconds"] for r in mine]))
    return "\n".join(lines)


def geometry_table(geometry: dict) -> str:
    lines = ["| model | mean ‖f‖ | cosine to own class-mean direction | cosine to the teacher's class-mean "
             "direction (through the dino projector when dims differ) | dino projector: mean ‖f‖ |",
             "|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for name, entry in geometry.items():
        groups.setdefault(name.split("#")[0], []).append(entry)
    for name, entries in groups.items():
        cells = [mean_sd([float(e["norms"].mean()) for e in entries]),
                 mean_sd([e["cosine_own"] for e in entries])]
        cells.append(mean_sd([e["cosine_teacher_means"] for e in entries])
                     if "cosine_teacher_means" in entries[0] else "")
        cells.append(mean_sd([float(e["projected_norms"].mean()) for e in entries])
                     if "projected_norms" in entries[0] else "")
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
    coverage_rows = "\n".join(f"| {100 * p['coverage']:.0f}% | {p['min_margin']:.4f} | {p['precision']:.1f}% |"
                              for p in truth.get("precision_vs_coverage", []))
    text = f"""# clipkd demo report

Data: toyworld ({context['scale']}), students ({context['student']}, embedding dim {context['student_dim']}; the
teacher's: {context['teacher_dim']}) trained on {context['student_images']} images for {context['epochs']} epoch(s),
{seeds} seed(s) per student; evaluated on {context['val_images']} val images (retrieval: 5 captions each; zero-shot:
the single-object images, 16 kinds). {context['projectors']} Wall time {context['seconds']:.0f} s.

## Results (Recall@K and top-1 in %; mean ± sd over seeds)

{context['comparison']}

## The dino-loss's effect: paired differences (CLIP-KD + dino minus CLIP-KD)

Each seed trains both students with the same seed, hence the same initial weights, data order, cached teacher
views and labels: the difference within a seed is the dino-loss's effect plus training noise. The interval is the
95% t-interval over seeds: mean ± t(0.975, n-1) · sd / √n.

{context['paired']}

{context['paired_words']}

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

The dino-loss pulls the student's feature (through its projector when the dims differ) toward the teacher's
class-mean direction and its norm up to at least the teacher's: its effect shows in the norm column (the projector's
when there is one) and in the cosine to the teacher's class-mean direction.

![feature norms](norms.png)

## Training curves

Each loss term over the steps (weighted as trained; `loss` is their sum), from each run's `log.jsonl`:

![loss terms](losses.png)

Evaluations after each epoch:

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
    from clipkd_dino.models.factory import model_config
    from clipkd_dino.report import format_metrics, plot_eval_curves, plot_loss_curves
    from clipkd_dino.teacher.stats import format_stats, label_stats, plot_stats

    if args.seeds is not None and args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if args.cls:
        from clipkd_dino.classify.demo import run_cls_demo

        run_cls_demo(Path(args.out or "runs/demo_cls"), args.seeds or 3, args.smoke, args.device)
        return 0
    args.seeds = args.seeds or 1
    dims = {"student": model_config(args.student)["embed_dim"], "teacher": model_config("toy-teacher")["embed_dim"]}
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
    labels = label(teacher, pool, data, scale, out, args.min_margin, args.device)
    stats = label_stats(labels)
    plot_stats(labels, labels / "stats.png")
    print(format_stats(stats))
    plan = StudentPlan(data, scale, labels, args.student, args.epochs, args.dino_weight, args.device, teacher)
    runs = train_students(plan, out, range(args.seeds))
    geometry = analyse(teacher, labels, data, runs, args.device)
    curves = {f"{r['name']} (seed {r['seed']})": Path(r["dir"]) / "metrics.jsonl" for r in runs}
    plot_eval_curves(curves, out / "curves.png")
    plot_loss_curves({label: path.with_name("log.jsonl") for label, path in curves.items()}, out / "losses.png")
    plot_norms(geometry, out / "norms.png")
    comparison = comparison_table(teacher_metrics, runs)
    paired = paired_rows(runs, "CLIP-KD + dino", "CLIP-KD")
    context = {
        "scale": "smoke" if args.smoke else "full", "student_images": scale.student_shards * scale.shard_size,
        "student": args.student, "student_dim": dims["student"], "teacher_dim": dims["teacher"],
        "projectors": "Equal dims: FD and the dino-loss act on the student's own embedding, no projector."
        if dims["student"] == dims["teacher"] else "The dims differ: FD (and ICL) go through a Linear projector, "
        "the dino-loss through BatchNorm -> Dropout -> Linear.",
        "paired": paired_table(paired, "CLIP-KD + dino", "CLIP-KD"), "paired_words": paired_words(paired),
        "epochs": args.epochs or scale.epochs, "seeds": args.seeds,
        "val_images": teacher_metrics["retrieval"]["num_images"], "seconds": time.time() - start,
        "comparison": comparison, "geometry": geometry_table(geometry), "label_stats": stats,
        "pool": ConceptPool.load(pool).names(),
    }
    report = write_report(out, context)
    write_json_atomic(out / "summary.json", {
        "teacher": {"checkpoint": teacher, "metrics": teacher_metrics},
        "student_model": args.student, "paired": paired_summary(paired),
        "students": [{"name": r["name"], "seed": r["seed"], "dir": r["dir"], "train_seconds":
                      r["summary"]["wall_seconds"], "metrics": r["summary"]["metrics"]} for r in runs],
        "labels": stats, "pool": context["pool"], "seconds": round(context["seconds"], 1),
        "geometry": {name: {k: (float(v.mean()) if hasattr(v, "mean") else v) for k, v in entry.items()}
                     for name, entry in geometry.items()},
    })
    print("\n" + comparison + "\n\n" + context["paired"] + "\n" + context["paired_words"])
    print(f"\n[demo] report: {report}; TensorBoard: tensorboard --logdir {out}")
    return 0
