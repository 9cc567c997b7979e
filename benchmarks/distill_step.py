"""Time one distillation step (forward + backward + AdamW) per teacher mode, as ratios measured in one run.

    python benchmarks/distill_step.py [--pairs toy ViT-B-16] [--batch 32] [--steps 5] [--device cpu|cuda] [--compile]

For each teacher/student pair (toy: toy-teacher -> toy-student at 48 px; ViT-B-16: ViT-B-16 -> ViT-T-16 at 224 px,
random weights), it times:
  student only         plain CLIP training of the student (no teacher)
  cached               CLIP-KD (task + CRD + ICL + FD) from a teacher-embedding cache (no teacher forward)
  cached + dino        the same plus the dino-loss
  online fp32 / bf16   CLIP-KD + dino with the frozen teacher run at every step, fp32 or bf16 weights
  compiled             (--compile) cached + dino under torch.compile (inductor), as `train.compile: true`
and prints each time with its ratio to the student-only step, and the dino-loss's own cost (cached + dino / cached).
Then the real training loop (`--trainer-steps`, toy pair from a cache on toyworld shards): host syncs per optimiser
step made by our code outside log steps (goal <= 1), and the step time with the data wait included and excluded.
The cache is a real one on disk (random embeddings for the batch's samples), read through memory maps by the
lookup the loader workers run (`BatchTargets`); as in training, that lookup is not part of the timed step.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from clipkd_dino.config import DistillConfig, recipe_weights
from clipkd_dino.distill.distiller import CLIPDistiller
from clipkd_dino.data.identity import SampleIndex, identity_hashes
from clipkd_dino.distill.teachers import BatchTargets, CachedTeacher, OnlineTeacher
from clipkd_dino.models import create_model, get_tokenizer, image_size, model_config
from clipkd_dino.runtime import resolve_device
from clipkd_dino.teacher.cache import to_numpy
from clipkd_dino.distill.objectives import CLIPObjective
from timing import seconds_per_step

PAIRS = {"toy": ("toy-teacher", "toy-student"), "ViT-B-16": ("ViT-B-16", "ViT-T-16")}


def make_cache(directory: Path, keys: list[str], dim: int) -> None:
    """A labelling output holding only an identity index and a 2-view cache of random embeddings for `keys`."""
    SampleIndex.build(identity_hashes(keys))[0].save(directory / "samples")
    (directory / "cache").mkdir()
    arrays = {"images": to_numpy(torch.randn(len(keys), 2, dim) * 10, "fp16"),
              "texts": to_numpy(torch.randn(len(keys), dim) * 10, "fp16"),
              "caption_offsets": np.arange(len(keys) + 1, dtype=np.int64)}
    for name, array in arrays.items():
        np.save(directory / "cache" / f"{name}.npy", array)
    (directory / "cache" / "manifest.json").write_text(json.dumps({
        "dtype": "fp16", "views": 2, "dim": dim, "teacher_logit_scale": 100.0,
        "view_spec": {"size": 224, "scale": [0.9, 1.0]}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trainer-steps", type=int, default=40,
                        help="steps of the real training loop for the syncs and data-wait row (0: none)")
    parser.add_argument("--compile", action="store_true",
                        help="add a row: cached + dino under torch.compile (train.compile: true)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; batch {args.batch}; {args.steps} timed steps after "
          f"{args.warmup} (fp32 on CPU, bf16 autocast on CUDA)")
    print(f"{'pair':<22} {'mode':<20} {'s/step':>8} {'vs student only':>16}")
    for pair in args.pairs:
        teacher_name, student_name = PAIRS[pair]
        torch.manual_seed(0)
        student = create_model(student_name, device=device)
        size, context = image_size(student), get_tokenizer(student_name)(["a"]).shape[1]
        keys = [f"source/{i:09d}" for i in range(args.batch)]
        texts = torch.randint(2, 90, (args.batch, context))
        texts[:, context // 2] = student.vocab_size - 1
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
        batch = {"images": images, "texts": texts.to(device),
                 "keys": keys, "ids": torch.from_numpy(identity_hashes(keys)),
                 "view": torch.randint(0, 2, (args.batch,)), "caption_index": torch.zeros(args.batch, dtype=torch.long),
                 "labels": torch.arange(args.batch) % 16, "skipped": {}}  # every sample labelled: full dino work
        d_t, d_s = model_config(teacher_name)["embed_dim"], model_config(student_name)["embed_dim"]
        with tempfile.TemporaryDirectory() as tmp:
            make_cache(Path(tmp), keys, d_t)
            cached = CachedTeacher(tmp, student)
            batch = BatchTargets(cached.cache)(batch)  # the loader worker's part
            means = torch.randn(16, d_t, device=device)

            def distiller(teacher, dino: float) -> CLIPDistiller:
                config = DistillConfig(weights=recipe_weights() | {"dino": dino})
                return CLIPDistiller(student, teacher, config, d_s, means, None).to(device)

            modes = {"student only": CLIPObjective(student).to(device), "cached": distiller(cached, 0.0),
                     "cached + dino": distiller(cached, 1.0)}
            if args.compile:
                modes["cached + dino, compiled"] = distiller(cached, 1.0)
                modes["cached + dino, compiled"].compile()
            for weights in ("fp32", "bf16"):
                modes[f"online {weights} teacher"] = distiller(
                    OnlineTeacher(teacher_name, None, weights, device, student), 1.0)
            times = {}
            for mode, objective in modes.items():
                times[mode] = seconds_per_step(objective.train(), batch, device, precision, args.warmup, args.steps)
                print(f"{teacher_name + ' -> ' + student_name:<22} {mode:<20} {times[mode]:8.3f} "
                      f"{times[mode] / times['student only']:15.2f}x", flush=True)
            print(f"{'':<22} {'dino-loss cost':<20} {'':>8} {times['cached + dino'] / times['cached']:15.3f}x "
                  "(cached + dino / cached)")
    if args.trainer_steps:
        trainer_row(args, device)


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


def trainer_row(args: argparse.Namespace, device: torch.device) -> None:
    """The real training loop (toy student from a toy-teacher cache on toyworld shards, one loader worker):
    host reads of tensor values made by clipkd's own code per optimiser step outside logging steps, and the step
    time with the data wait included and excluded (from the log's samples/s and data_wait)."""
    import sys

    import yaml

    from clipkd_dino.config import load_config
    from clipkd_dino.toyworld.generate import KINDS, generate
    from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset
    from clipkd_dino.train.trainer import Trainer

    reads = [0]

    def counted(function):
        def wrapper(*a, **k):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("clipkd_dino"):
                reads[0] += 1
            return function(*a, **k)
        return wrapper

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        generate(tmp / "tw", n_train=args.batch * (args.trainer_steps + 1), n_val=8, image_size=48, seed=0,
                 workers=1, shard_size=256)
        (tmp / "pool.json").write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1, "concepts": [
            {"concept": k, "count": 1} for k in KINDS]}))
        label_dataset(LabelSettings(teacher="toy-teacher", teacher_pretrained="assets/toy_teacher.pt",
                                    concepts=str(tmp / "pool.json"), data=str(tmp / "tw" / "train" / "shards"),
                                    out=str(tmp / "labels"), templates=str(tmp / "tw" / "val" / "zeroshot" /
                                                                           "templates.json"),
                                    cache_views=2, workers=0, device=str(device)))
        log_every = 5
        (tmp / "config.yaml").write_text(yaml.safe_dump({
            "model": {"name": "toy-student"},
            "data": {"train": str(tmp / "tw" / "train" / "shards"), "workers": 1,
                     "num_samples": args.batch * args.trainer_steps},
            "train": {"epochs": 1, "batch_size": args.batch, "device": str(device), "log_every_steps": log_every,
                      "eval_every_epochs": 0, "output_dir": str(tmp / "run")},
            "distill": {"teacher": "toy-teacher", "cache": str(tmp / "labels"), "labels": str(tmp / "labels")}}))
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        trainer = Trainer(load_config(tmp / "config.yaml"))
        per_step, optimizer_step = [], trainer._optimizer_step

        def counting(skip: bool) -> float:
            per_step.append(reads[0])
            reads[0] = 0
            return optimizer_step(skip)

        trainer._optimizer_step = counting
        trainer.run()
        log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()][1:]
    quiet = [count for step, count in enumerate(per_step, 1) if step > 2 and (step - 1) % log_every]
    included = sum(args.batch / record["samples_per_s"] for record in log) / len(log)
    excluded = sum(args.batch / record["samples_per_s"] * (1 - record["data_wait"]) for record in log) / len(log)
    print(f"\ntraining loop, toy-teacher cache -> toy-student, batch {args.batch}, {args.trainer_steps} steps, "
          "1 loader worker:")
    print(f"host syncs per step outside log steps: max {max(quiet)}, mean {sum(quiet) / len(quiet):.2f} (goal <= 1)")
    print(f"s/step with data waiting included {included:.3f}, excluded {excluded:.3f} "
          f"(data wait {1 - excluded / included:.0%} of the step)")


if __name__ == "__main__":
    main()
