"""The embedded toy data set: procedurally drawn shapes with captions (`clipkd toyworld`).

`generate` writes (paths inside CSV and JSONL files are relative to the file that lists them):

    DIR/toyworld.json                          settings, counts per split and per kind (what `generate` returns)
    DIR/{split}/images/{KEY}.png               KEY = f"{split}-{index:07d}"
    DIR/{split}/shards/{split}-{shard:06d}.tar webdataset shards: KEY.png, KEY.txt (5 captions), KEY.json (metadata)
    DIR/{split}/shards/sizes.json              samples per shard (open_clip convention)
    DIR/{split}/captions.csv                   tab-separated "filepath", "title": one row per caption
    DIR/val/retrieval.jsonl                    {"image", "captions", "kinds"} per image (kinds: one per object)
    DIR/val/zeroshot/classnames.json           KINDS (class index = position)
    DIR/val/zeroshot/templates.json            ZEROSHOT_TEMPLATES
    DIR/val/zeroshot/samples.csv               tab-separated "filepath", "label": the single-object images

Each sample comes from its own generator seeded with (seed, split, index), so the bytes written do not depend on
the number of workers.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clipkd_dino import __version__
from clipkd_dino.toyworld.captions import (
    CAPTIONS_PER_IMAGE,
    KINDS,
    ZEROSHOT_TEMPLATES,
    make_captions,
    vocabulary_words,
)
from clipkd_dino.toyworld.scene import BACKGROUND_COLOURS, COLOURS, Scene, render, sample_scene
from clipkd_dino.errors import UserError

__all__ = ["COLOURS", "KINDS", "ZEROSHOT_TEMPLATES", "describe", "generate", "render_sample", "vocabulary_words"]

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_SIZE = 1000
IMAGE_SIZE_RANGE = (16, 1024)


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def _metadata(
    scene: Scene, boxes: list[tuple[int, int, int, int]], split: str, index: int, captions: list[str]
) -> dict[str, Any]:
    background = scene.background
    return {
        "key": sample_key(split, index),
        "image_size": scene.size,
        "background": {
            "style": background.style,
            "colours": list(background.colours),
            "description": background.describe(),
        },
        "objects": [
            {
                "kind": obj.kind,
                "colour": obj.colour,
                "size": obj.size,
                "box": list(box),
                "rotation": round(obj.rotation, 1),
                "mirrored": obj.mirrored,
            }
            for obj, box in zip(scene.objects, boxes)
        ],
        "captions": captions,
    }


def render_sample(seed: int, split: str, index: int, image_size: int) -> tuple[bytes, dict[str, Any]]:
    """PNG bytes and metadata (ground truth and captions) of one sample; a function of its arguments only."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng, image_size)
    captions = make_captions(rng, scene)
    image, boxes = render(scene)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), _metadata(scene, boxes, split, index, captions)


@dataclass(frozen=True)
class _Chunk:
    """Samples [start, stop) of a split, written as one shard and as loose image files."""

    out_dir: str
    split: str
    shard: int
    start: int
    stop: int
    image_size: int
    seed: int

    @property
    def shard_name(self) -> str:
        return f"{self.split}-{self.shard:06d}.tar"


def _write_chunk(chunk: _Chunk) -> list[dict[str, Any]]:
    from webdataset import TarWriter  # imports torch: only where shards are written

    split_dir = Path(chunk.out_dir) / chunk.split
    metadata = []
    with TarWriter(str(split_dir / "shards" / chunk.shard_name), encoder=False, mtime=0.0) as writer:
        for index in range(chunk.start, chunk.stop):
            png, meta = render_sample(chunk.seed, chunk.split, index, chunk.image_size)
            (split_dir / "images" / f"{meta['key']}.png").write_bytes(png)
            writer.write(
                {
                    "__key__": meta["key"],
                    "png": png,
                    "txt": "\n".join(meta["captions"]).encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
            metadata.append(meta)
    return metadata


def _run_chunks(chunks: list[_Chunk], workers: int) -> Iterator[list[dict[str, Any]]]:
    """Metadata of each chunk, in chunk order."""
    if workers == 1 or len(chunks) < 2:
        yield from map(_write_chunk, chunks)
        return
    # spawn: safe whatever threads the caller (e.g. torch) has started.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
        yield from pool.imap(_write_chunk, chunks)


def _check_arguments(
    out_dir: Path, n_train: int, n_val: int, image_size: int, seed: int, workers: int, shard_size: int
) -> None:
    for flag, value in (("--train", n_train), ("--val", n_val), ("--seed", seed)):
        if value < 0:
            raise UserError(f"{flag} must be >= 0, got {value}")
    for flag, value in (("--workers", workers), ("--shard-size", shard_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if n_train + n_val == 0:
        raise UserError("--train and --val are both 0: nothing to generate")
    low, high = IMAGE_SIZE_RANGE
    if not low <= image_size <= high:
        raise UserError(f"--image-size must be between {low} and {high}, got {image_size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and not {p.name for p in out_dir.iterdir()} <= {"toyworld.json", *SPLITS}:
        raise UserError(f"--out {out_dir}: directory holds files that are not a toy world's; use a new directory")


def _prepare_layout(out_dir: Path) -> None:
    """Remove a previous (or interrupted) toy world in `out_dir` and create the folders."""
    try:
        (out_dir / "toyworld.json").unlink(missing_ok=True)
        for split in SPLITS:
            shutil.rmtree(out_dir / split, ignore_errors=True)
            (out_dir / split / "images").mkdir(parents=True)
            (out_dir / split / "shards").mkdir()
        (out_dir / "val" / "zeroshot").mkdir()
    except OSError as error:
        raise UserError(f"--out {out_dir}: cannot create the output folders: {error.strerror or error}") from None


def _tsv_writer(stack: ExitStack, path: Path, header: tuple[str, str]) -> Any:
    writer = csv.writer(stack.enter_context(path.open("w", newline="")), delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    return writer


class _SplitStats:
    def __init__(self) -> None:
        self.images = 0
        self.objects_per_image: Counter[int] = Counter()
        self.objects_per_kind: Counter[str] = Counter()
        self.objects_per_colour: Counter[str] = Counter()
        self.single_object_images_per_kind: Counter[str] = Counter()

    def add(self, meta: dict[str, Any]) -> None:
        objects = meta["objects"]
        self.images += 1
        self.objects_per_image[len(objects)] += 1
        self.objects_per_kind.update(o["kind"] for o in objects)
        self.objects_per_colour.update(o["colour"] for o in objects)
        if len(objects) == 1:
            self.single_object_images_per_kind[objects[0]["kind"]] += 1

    def summary(self, shards: int) -> dict[str, Any]:
        return {
            "images": self.images,
            "captions": self.images * CAPTIONS_PER_IMAGE,
            "shards": shards,
            "single_object_images": self.objects_per_image[1],
            "objects_per_image": {str(n): self.objects_per_image[n] for n in (1, 2, 3)},
            "objects_per_kind": {kind: self.objects_per_kind[kind] for kind in KINDS},
            "single_object_images_per_kind": {kind: self.single_object_images_per_kind[kind] for kind in KINDS},
            "objects_per_colour": {colour: self.objects_per_colour[colour] for colour in COLOURS},
        }


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def generate(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    image_size: int = 64,
    seed: int = 0,
    workers: int = 2,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> dict[str, Any]:
    """Write the toy world to `out_dir` (layout in the module docstring) and return its summary (toyworld.json).

    A directory that holds only a previous toy world (toyworld.json, train/, val/) is replaced; a directory with
    anything else in it is refused.
    """
    out = Path(out_dir)
    _check_arguments(out, n_train, n_val, image_size, seed, workers, shard_size)
    _prepare_layout(out)
    sizes = dict(zip(SPLITS, (n_train, n_val)))
    chunks = [
        _Chunk(str(out), split, shard, start, min(start + shard_size, size), image_size, seed)
        for split, size in sizes.items()
        for shard, start in enumerate(range(0, size, shard_size))
    ]
    stats = {split: _SplitStats() for split in SPLITS}
    with ExitStack() as stack:
        captions = {split: _tsv_writer(stack, out / split / "captions.csv", ("filepath", "title")) for split in SPLITS}
        zeroshot = _tsv_writer(stack, out / "val" / "zeroshot" / "samples.csv", ("filepath", "label"))
        retrieval = stack.enter_context((out / "val" / "retrieval.jsonl").open("w"))
        progress = stack.enter_context(tqdm(total=n_train + n_val, unit="img", desc="toyworld", file=sys.stderr))
        for chunk, metadata in zip(chunks, _run_chunks(chunks, workers)):
            for meta in metadata:
                image = f"images/{meta['key']}.png"
                kinds = [obj["kind"] for obj in meta["objects"]]
                captions[chunk.split].writerows((image, caption) for caption in meta["captions"])
                stats[chunk.split].add(meta)
                if chunk.split == "val":
                    retrieval.write(json.dumps({"image": image, "captions": meta["captions"], "kinds": kinds}) + "\n")
                    if len(kinds) == 1:
                        zeroshot.writerow((f"../{image}", KINDS.index(kinds[0])))
            progress.update(len(metadata))
    for split in SPLITS:
        shard_sizes = {c.shard_name: c.stop - c.start for c in chunks if c.split == split}
        _write_json(out / split / "shards" / "sizes.json", shard_sizes)
    _write_json(out / "val" / "zeroshot" / "classnames.json", list(KINDS))
    _write_json(out / "val" / "zeroshot" / "templates.json", list(ZEROSHOT_TEMPLATES))
    summary = {
        "format_version": FORMAT_VERSION,
        "generator": f"clipkd-dino {__version__}",
        "settings": {
            "train": n_train,
            "val": n_val,
            "image_size": image_size,
            "seed": seed,
            "shard_size": shard_size,
        },
        "kinds": list(KINDS),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "background_colours": {name: list(rgb) for name, rgb in BACKGROUND_COLOURS.items()},
        "zeroshot_templates": list(ZEROSHOT_TEMPLATES),
        "vocabulary_size": len(vocabulary_words()),
        "splits": {
            split: stats[split].summary(sum(c.split == split for c in chunks))
            for split in SPLITS
        },
    }
    _write_json(out / "toyworld.json", summary)
    return summary


def describe(summary: dict[str, Any], out_dir: str | Path, seconds: float, workers: int) -> str:
    """A one-paragraph account of a `generate` run."""
    settings, splits = summary["settings"], summary["splits"]
    train, val = splits["train"], splits["val"]
    images = train["images"] + val["images"]
    single = train["single_object_images"] + val["single_object_images"]
    per_kind = {kind: train["objects_per_kind"][kind] + val["objects_per_kind"][kind] for kind in summary["kinds"]}
    rarest, commonest = min(per_kind, key=per_kind.get), max(per_kind, key=per_kind.get)
    return (
        f"Wrote the toy world to {out_dir} in {seconds:.1f} s with {workers} worker(s): {train['images']:,} train "
        f"and {val['images']:,} val images of {settings['image_size']} px (seed {settings['seed']}), "
        f"{CAPTIONS_PER_IMAGE} captions each, in {train['shards']} + {val['shards']} webdataset shards of up to "
        f"{settings['shard_size']:,} samples. {single / images:.1%} of the images hold a single object; objects "
        f"per kind range from {per_kind[rarest]:,} ({rarest}) to {per_kind[commonest]:,} ({commonest}). Zero-shot set: "
        f"{val['single_object_images']:,} single-object val images, {len(summary['kinds'])} classes, "
        f"{len(summary['zeroshot_templates'])} templates. The captions and prompts use "
        f"{summary['vocabulary_size']} distinct words."
    )
