"""Seconds and peak memory of retrieval scoring: chunked torch against faiss, on random unit embeddings.

Each configuration runs in a fresh child process, so its peak resident memory (`os.wait4`'s ru_maxrss) is its own.
The child makes N image and M caption embeddings (M / N captions per image, dim 512 by default), records its peak
memory with the data in place (torch itself included), then times `retrieval_metrics` (i2t and t2i Recall@1/5/10,
any_caption); the difference of the two memory columns is what the search added.

    python benchmarks/similarity_speed.py                                   # 5k x 25k and 100k x 500k
    python benchmarks/similarity_speed.py --sizes 200x1000 --backends torch faiss --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1024  # ru_maxrss is in KiB on Linux


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    from clipkd_dino.eval.retrieval import retrieval_metrics

    images_n, texts_n = args.child
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    images = _unit(images_n, args.dim, generator, dtype)
    texts = _unit(texts_n, args.dim, generator, dtype)
    owner = torch.arange(texts_n) * images_n // texts_n
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    metrics = retrieval_metrics(images, texts, owner, backend=args.backends[0], chunk_size=args.query_chunk,
                                gallery_chunk=args.gallery_chunk)
    print(json.dumps({"seconds": time.perf_counter() - start, "data_rss_kib": data_rss, "i2t_R@1": metrics["i2t_R@1"]}))


def _unit(rows: int, dim: int, generator, dtype):
    """Random unit rows, drawn and normalised in blocks so that no float32 copy of the whole set is ever made."""
    import torch

    out = torch.empty(rows, dim, dtype=dtype)
    for start in range(0, rows, 65536):
        block = torch.randn(min(65536, rows - start), dim, generator=generator)
        out[start:start + len(block)] = torch.nn.functional.normalize(block, dim=-1).to(dtype)
    return out


def measure(size: tuple[int, int], backend: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", str(size[0]), str(size[1]), "--backends", backend,
               "--dim", str(args.dim), "--dtype", args.dtype, "--query-chunk", str(args.query_chunk),
               "--gallery-chunk", str(args.gallery_chunk)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"child failed ({process.returncode}): {' '.join(command)}")
    result = json.loads(output.strip().splitlines()[-1])
    return {**result, "peak_rss_kib": usage.ru_maxrss}


def parse_size(text: str) -> tuple[int, int]:
    images, texts = (int(part) for part in text.lower().split("x"))
    return images, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(5000, 25000), (100000, 500000)],
                        metavar="NxM", help="images x captions (default: 5000x25000 100000x500000)")
    parser.add_argument("--backends", nargs="+", default=["torch", "faiss"], choices=("torch", "faiss"))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="storage of the embeddings")
    parser.add_argument("--query-chunk", type=int, default=1024)
    parser.add_argument("--gallery-chunk", type=int, default=65536)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"dim {args.dim}, {args.dtype} storage, query chunk {args.query_chunk}, gallery chunk {args.gallery_chunk},"
          f" {os.cpu_count()} CPUs")
    print("| images x captions | backend | seconds | peak RSS MiB | RSS before the search MiB |")
    print("|---|---|---:|---:|---:|")
    for size in args.sizes:
        for backend in args.backends:
            result = measure(size, backend, args)
            print(f"| {size[0]} x {size[1]} | {backend} | {result['seconds']:.2f} | "
                  f"{result['peak_rss_kib'] / MIB:.0f} | {result['data_rss_kib'] / MIB:.0f} |", flush=True)


if __name__ == "__main__":
    main()
