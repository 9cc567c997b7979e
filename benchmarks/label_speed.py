"""Speed and memory of the labelling pass against the teacher's bare image encoding of the same data, one run.

    python benchmarks/label_speed.py [--images 2000] [--vit-images 256] [--memory-images 5000 20000]

Rows:
  toy teacher on toyworld: `encode images` is the teacher's bare image forward over the images (eval view, same
  loader settings), `encode captions` its bare text forward over all their captions (tokenised in batches); the
  pass with K = 0 (labels, class means of images and captions) and K = 2 (plus the 2-view cache). The "speed vs
  forwards" column is the time of the forwards the pass must do ((1 + K) image forwards per image and one per
  caption) over the pass's time: 1.00 means the pass costs nothing beyond those forwards (goal: at least 0.9).
  ViT-B-16 (random weights) on a few hundred toyworld images upscaled to 224 px: the same at real shapes.
  Peak memory: the pass's peak RSS (subprocess) on two data sizes; it should not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clipkd_dino.toyworld.generate import KINDS, generate
from clipkd_dino.eval.encode import encode_images, encode_texts
from clipkd_dino.models import create_model, get_tokenizer, image_transforms
from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset

REPO = Path(__file__).resolve().parents[1]
TOY_TEACHER = REPO / "assets" / "toy_teacher.pt"


def write_pool(path: Path) -> Path:
    path.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": k, "count": 1} for k in KINDS]}))
    return path


def time_pass(settings: LabelSettings) -> float:
    start = time.perf_counter()
    label_dataset(settings)
    return time.perf_counter() - start


def compare(name: str, teacher: str, pretrained: str | None, data: Path, pool: Path, tmp: Path, workers: int,
            batch: int) -> None:
    model = create_model(name, pretrained)
    paths = sorted((data / "train" / "images").glob("*.png"))
    start = time.perf_counter()
    encode_images(model, paths, image_transforms(model, augment=False)[1], torch.device("cpu"),
                  batch_size=batch, num_workers=workers)
    encode = time.perf_counter() - start
    captions = [line.split("\t", 1)[1] for line in
                (data / "train" / "captions.csv").read_text(encoding="utf-8").splitlines()[1:]]
    start = time.perf_counter()
    encode_texts(model, get_tokenizer(name), captions, torch.device("cpu"), batch_size=batch * 5)
    texts = time.perf_counter() - start
    for what, seconds in (("encode images", encode), ("encode captions", texts)):
        print(f"{teacher:<12} {len(paths):>7} {what:<18} {seconds:8.1f} {len(paths) / seconds:8.1f} {'':>10}",
              flush=True)
    for views in (0, 2):
        settings = LabelSettings(teacher=name, teacher_pretrained=pretrained, concepts=str(pool),
                                 data=str(data / "train" / "shards"), out=str(tmp / f"{name}-{views}"),
                                 templates=str(data / "val" / "zeroshot" / "templates.json"), cache_views=views,
                                 workers=workers, batch_size=batch, device="cpu")
        seconds = time_pass(settings)
        needed = encode * (1 + views) + texts
        print(f"{teacher:<12} {len(paths):>7} {f'label pass K={views}':<18} {seconds:8.1f} "
              f"{len(paths) / seconds:8.1f} {needed / seconds:10.2f}", flush=True)


def peak_memory(images: int, tmp: Path, pool: Path) -> float:
    """Peak RSS (MiB) of a K = 0 pass over `images` toyworld images at 32 px, in a fresh process."""
    data = tmp / f"mem{images}"
    generate(data, n_train=images, n_val=16, image_size=32, seed=1, workers=2, shard_size=5000)
    script = (f"from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset\n"
              f"label_dataset(LabelSettings(teacher='toy-teacher', teacher_pretrained={str(TOY_TEACHER)!r}, "
              f"concepts={str(pool)!r}, data={str(data / 'train' / 'shards')!r}, out={str(tmp / f'memout{images}')!r},"
              f" workers=2, device='cpu'))\n"
              "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--vit-images", type=int, default=256)
    parser.add_argument("--memory-images", type=int, nargs="*", default=[5000, 20000])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"device: {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"{'teacher':<12} {'images':>7} {'what':<18} {'seconds':>8} {'img/s':>8} {'speed vs forwards':>10}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pool = write_pool(tmp / "pool.json")
        toy = tmp / "toy"
        generate(toy, n_train=args.images, n_val=16, image_size=64, seed=1, workers=2, shard_size=1000)
        compare("toy-teacher", "toy-teacher", str(TOY_TEACHER), toy, pool, tmp, args.workers, 256)
        if args.vit_images:
            vit = tmp / "vit"
            generate(vit, n_train=args.vit_images, n_val=16, image_size=224, seed=1, workers=2, shard_size=128)
            compare("ViT-B-16", "ViT-B-16", None, vit, pool, tmp, args.workers, 32)
        for images in args.memory_images:
            print(f"peak RSS of a K=0 pass over {images} images: {peak_memory(images, tmp, pool):.0f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
