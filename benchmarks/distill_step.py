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

from clipkd_dino.config import DistillConfig, LossWeights
from clipkd_dino.distill.distiller import CLIPDistiller
from clipkd_dino.data.identity import SampleIndex, identity_hashes
from clipkd_dino.distill.teachers import BatchTargets, CachedTeacher, OnlineTeacher
from clipkd_dino.models import create_model, get_tokenizer, image_size, model_config
from clipkd_dino.runtime import resolve_device
from clipkd_dino.teacher.cache import to_numpy
from clipkd_dino.train.objectives import CLIPObjective
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
                config = DistillConfig(weights=LossWeights(dino=dino))
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


if __name__ == "__main__":
    main()
