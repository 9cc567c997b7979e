"""Speed of the training data pipeline on real-sized JPEG shards: ours, open_clip's, and bare decode + crop.

    python benchmarks/loader_speed.py [--images 4000] [--size 448] [--batch 128] [--workers 1 2] [--shuffle 200]
                                      [--shards DIR]   (your own shards; --images is then the epoch's size)

Data: toyworld drawn at --size px and stored as JPEG (quality 90) in webdataset shards of 250 samples. Transform:
RandomResizedCrop(224, scale 0.9-1.0, bicubic), then uint8 pixels (ours, and the bare row) or ToTensor + Normalize
(open_clip's pipeline, which normalises in its workers); one torch thread per process. One epoch = --images samples, batch --batch.
Rows (all in this one run, so the ratios are what counts on a shared machine; open_clip runs resampled, ours
--epochs exact or resampled):
  bare         decode + crop in this process (the limit per process)
  ours         TrainData on the shards (W loader workers, each reading its own stream of shard visits)
  open_clip    open_clip_train.data.get_wds_dataset, resampled, the same shards and transform (needs pandas; with
               webdataset 1.x its tar expander is given eof_value=None, as the guide says)
Columns: images/s; images/s per worker; bytes the loader workers read in the epoch (rchar of /proc/PID/io) over
the shards' size (both with a --shuffle buffer per worker, filled beyond the epoch's samples: small against the data,
as it is at scale); for ours, a resume at 90% of the epoch with the cursors of the uninterrupted run: seconds and
bytes read to the first batch, in shards of the average size per worker.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from torchvision import transforms as T

from clipkd_dino.config import DataConfig
from clipkd_dino.data.pairs import PairImages, TrainData
from clipkd_dino.toyworld.generate import generate
from clipkd_dino.models import get_tokenizer

SHARD_SIZE = 250
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def jpeg_shards(png_shards: Path, out: Path) -> Path:
    """The toyworld shards re-encoded: each sample's image as JPEG, its caption lines as they were."""
    out.mkdir(parents=True)
    for shard in sorted(png_shards.glob("*.tar")):
        with tarfile.open(shard) as source, tarfile.open(out / shard.name, "w") as sink:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                name = member.name
                if name.endswith(".png"):
                    buffer = io.BytesIO()
                    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="JPEG", quality=90)
                    data, name = buffer.getvalue(), name[:-4] + ".jpg"
                elif not name.endswith(".txt"):
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                sink.addfile(info, io.BytesIO(data))
    (out / "sizes.json").write_text((png_shards / "sizes.json").read_text())
    return out


def train_transform(uint8: bool, size: int = 224):
    """The training crop; uint8 pixels (ours: normalised later, on the device) or normalised float (open_clip's)."""
    crop = T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, T.PILToTensor()] if uint8 else [crop, T.ToTensor(), T.Normalize(MEAN, STD)])


def worker_pids() -> list[int]:
    """The processes this one started (the DataLoader workers)."""
    me, children = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            children.append(int(stat.parent.name))
    return children


def read_bytes(pids: list[int]) -> int:
    """Bytes read by the processes so far (rchar: every read(), page cache hits included)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                total += int(line.split()[1])
    return total


def drain(loader, batches: int) -> tuple[float, int, list]:
    """(seconds, bytes the workers read, the batches) for `batches` batches of `loader`, read before the workers
    are shut down."""
    start = time.perf_counter()
    iterator = iter(loader)
    got = [next(iterator) for _ in range(batches)]
    seconds = time.perf_counter() - start
    read = read_bytes(worker_pids())
    del iterator
    return seconds, read, got


def bare(shards: Path, images: int) -> float:
    """images/s of decode + crop in this process over the JPEGs in memory."""
    encoded = []
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as archive:
            encoded += [archive.extractfile(m).read() for m in archive.getmembers()
                        if m.name.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))]
    transform = train_transform(uint8=True)
    start = time.perf_counter()
    for data in encoded[:images]:
        transform(Image.open(io.BytesIO(data)).convert("RGB"))
    return min(images, len(encoded)) / (time.perf_counter() - start)


def ours(shards: Path, images: int, batch: int, workers: int, shuffle: int, epochs: str) -> tuple[float, int, dict]:
    config = DataConfig(train=str(shards), num_samples=images if epochs == "resampled" else None, epochs=epochs,
                        workers=workers, shuffle_buffer=shuffle)
    data = TrainData(config, PairImages(train_transform(uint8=True)), get_tokenizer("ViT-B-16"), batch_size=batch)
    steps = data.steps_per_epoch
    seconds, read, got = drain(data._webdataset_loader(0, 0, None), steps)
    resume_at = int(0.9 * steps)
    cursors = {b["cursor"]["stream"]: b["cursor"] for b in got[:resume_at]}
    start = time.perf_counter()
    iterator = iter(data._webdataset_loader(0, resume_at, cursors))
    next(iterator)
    resume = {"seconds": time.perf_counter() - start, "bytes": read_bytes(worker_pids())}
    del iterator
    return steps * batch / seconds, read, resume


def open_clips(shards: Path, images: int, batch: int, workers: int, shuffle: int) -> tuple[float, int]:
    import open_clip_train.data as oc_data
    import webdataset

    oc_data._SAMPLE_SHUFFLE_SIZE, oc_data._SAMPLE_SHUFFLE_INITIAL = shuffle, min(shuffle, 500)  # as ours
    oc_data.tar_file_expander = functools.partial(webdataset.tariterators.tar_file_expander, eof_value=None)
    urls = "::".join(str(p) for p in sorted(shards.glob("*.tar")))
    args = SimpleNamespace(train_data=urls, train_data_upsampling_factors=None, train_num_samples=images,
                           dataset_resampled=True, batch_size=batch, workers=workers, world_size=1, seed=0)
    info = oc_data.get_wds_dataset(args, train_transform(uint8=False), is_train=True, epoch=0,
                                   tokenizer=get_tokenizer("ViT-B-16"))
    steps = info.dataloader.num_batches
    seconds, read, _ = drain(info.dataloader, steps)
    info.dataloader._iterator = None  # persistent workers: let them go before the next row
    return steps * batch / seconds, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shards", type=Path,
                        help="a folder of your own webdataset shards (.jpg + .txt members) instead of toyworld's")
    parser.add_argument("--epochs", choices=("exact", "resampled"), default="exact",
                        help="our epochs: exact (each sample once; needs sizes.json beside the shards) or resampled")
    parser.add_argument("--shuffle", type=int, default=200,
                        help="sample shuffle buffer of both pipelines (small against the data, as at scale)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = args.shards or f"{args.images} toyworld images at {args.size} px as JPEG"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {data}, batch "
          f"{args.batch}, crop to 224 px, one thread per process")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.shards:
            shards = args.shards
        else:
            generate(tmp / "png", n_train=args.images, n_val=8, image_size=args.size, seed=0,
                     workers=os.cpu_count(), shard_size=SHARD_SIZE)
            shards = jpeg_shards(tmp / "png" / "train" / "shards", tmp / "jpeg")
        size = sum(p.stat().st_size for p in shards.glob("*.tar"))
        shard_bytes = size / len(list(shards.glob("*.tar")))
        print(f"data: {size / 2**20:.1f} MiB in {len(list(shards.glob('*.tar')))} shards\n")
        print("| pipeline | workers | images/s | images/s per worker | bytes read / data | resume at 90%: s | "
              "resume: bytes read (shards per worker) |")
        print("|---|---|---|---|---|---|---|")
        print(f"| bare decode + crop | 1 (this process) | {bare(shards, args.images):.0f} | | | | |", flush=True)
        for workers in args.workers:
            rate, read, resume = ours(shards, args.images, args.batch, workers, args.shuffle, args.epochs)
            print(f"| ours ({args.epochs}) | {workers} | {rate:.0f} | {rate / workers:.0f} | {read / size:.2f} | "
                  f"{resume['seconds']:.1f} | {resume['bytes'] / 2**20:.1f} MiB "
                  f"({resume['bytes'] / shard_bytes / workers:.2f}) |", flush=True)
            try:
                rate, read = open_clips(shards, args.images, args.batch, workers, args.shuffle)
                print(f"| open_clip | {workers} | {rate:.0f} | {rate / workers:.0f} | {read / size:.2f} | | |",
                      flush=True)
            except ImportError as error:
                print(f"| open_clip | {workers} | not run: {error} | | | | |")


if __name__ == "__main__":
    main()
