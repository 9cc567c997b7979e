"""Time one training step (forward + backward + AdamW) of CLIP models, per precision, and print a table.

    python benchmarks/train_step.py [--models toy-student toy-teacher ViT-T-16] [--batch 128] [--device cpu]

Image size and context length come from each model's config; inputs are random (this measures compute only).
The ratio column compares each precision with fp32 on the same model in the same run.
"""

from __future__ import annotations

import argparse
import platform

import torch

from clipkd_dino.models import create_model, get_tokenizer, image_size
from clipkd_dino.runtime import resolve_device
from clipkd_dino.distill.objectives import CLIPObjective
from timing import seconds_per_step


def step_seconds(name: str, batch: int, device: torch.device, precision: str, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(name, device=device)
    objective = CLIPObjective(model).to(device)
    size = image_size(model)
    context = get_tokenizer(name)(["a photo"]).shape[1]
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(2, 90, (batch, context), device=device)
    texts[:, context // 2] = model.vocab_size - 1  # an end-of-text token in every row
    return seconds_per_step(objective, {"images": images, "texts": texts}, device, precision, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy-student", "toy-teacher"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32 bf16 (+ fp16 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = resolve_device(args.device)
    precisions = args.precisions or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; batch {args.batch}; {args.steps} timed steps")
    print(f"{'model':<14} {'params M':>9} {'precision':>9} {'s/step':>8} {'samples/s':>10} {'vs fp32':>8}")
    for name in args.models:
        params = sum(p.numel() for p in create_model(name).parameters()) / 1e6
        baseline = None
        for precision in precisions:
            seconds = step_seconds(name, args.batch, device, precision, args.warmup, args.steps)
            baseline = baseline or seconds
            print(f"{name:<14} {params:9.2f} {precision:>9} {seconds:8.3f} {args.batch / seconds:10.0f} "
                  f"{baseline / seconds:7.2f}x")


if __name__ == "__main__":
    main()
