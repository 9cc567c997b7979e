"""Latency of a CLIP model's image and text towers on the CPU: torch eager against the ONNX export in onnxruntime.

    python benchmarks/export_speed.py [--model ViT-T-16] [--batches 1 32] [--repeats 20 5] [--threads N]

The model is randomly initialised (weights do not change the compute); the towers are exported by
`clipkd_dino.export.onnx_towers.export_onnx` (which checks onnxruntime's features against torch's). Both backends
run the same inputs with the same number of threads: pixels at the model's size and open_clip BPE ids of the export
checks' captions. Each cell is the median wall time of `repeats` runs after 3 warm-up runs; torch runs first,
onnxruntime after it (so neither backend's idle threads spin beside the other); the speed-up is torch / onnxruntime,
same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnxruntime
import torch

from clipkd_dino.models import create_model, image_size
from clipkd_dino.export.common import bpe_tokenizer, check_samples
from clipkd_dino.export.onnx_towers import IMAGE, SETTINGS_FILE, TEXT, export_onnx, onnx_session


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-T-16")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", nargs="+", type=int, default=[20, 5], help="timed runs per batch size")
    parser.add_argument("--threads", type=int, help="threads of both backends (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    captions = check_samples()[1]
    largest, size = max(args.batches), image_size(model)
    inputs = {IMAGE: torch.randn(largest, 3, size, size),
              TEXT: bpe_tokenizer(args.model)((captions * largest)[:largest])}
    cells = [(tower, batch, repeats) for tower in (IMAGE, TEXT)
             for batch, repeats in zip(args.batches, args.repeats * len(args.batches))]
    with torch.inference_mode():  # torch first, before onnxruntime's threads exist
        eager = [median_ms(lambda: getattr(model, tower.method)(inputs[tower][:batch]), repeats)
                 for tower, batch, repeats in cells]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        export_onnx(model, args.model, Path(folder) / "onnx")
        export_seconds = time.perf_counter() - start
        check = json.loads((Path(folder) / "onnx" / SETTINGS_FILE).read_text())["check"]
        sessions = {tower: onnx_session(Path(folder) / "onnx" / tower.file, threads) for tower in (IMAGE, TEXT)}
        onnx = [median_ms(lambda: sessions[tower].run(None, {tower.input: inputs[tower][:batch].numpy()}), repeats)
                for tower, batch, repeats in cells]
    cosine = min(min(tower["min_cosine"].values()) for tower in check.values())
    print(f"{args.model}, {platform.machine()} {platform.processor() or 'cpu'}, {threads} thread(s) for both; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; export {export_seconds:.1f} s; lowest "
          f"cosine onnxruntime vs torch {cosine:.7f}")
    print("| tower | batch | torch eager ms | onnxruntime ms | speed-up | onnxruntime items/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for (tower, batch, _), torch_ms, onnx_ms in zip(cells, eager, onnx):
        print(f"| {tower.file.split('.')[0]} | {batch} | {torch_ms:.1f} | {onnx_ms:.1f} | {torch_ms / onnx_ms:.2f}x | "
              f"{1000 * batch / onnx_ms:.0f} |")


if __name__ == "__main__":
    main()
