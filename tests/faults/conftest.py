"""A corrupted copy of toyworld data: one of each data fault planted, with the exact counts each command must report.

`planted` (session) holds a CSV, a folder of shards and a retrieval JSONL; `plant_csv` and `plant_shard` plant the
faults, so the real-photo tests plant the same ones among other images.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

# One row per image. A row with an invalid UTF-8 caption is dropped on its own (its image has no other row), so
# commands that read images (label, eval) and those that read captions (concepts) count each fault once.
CSV_FAULTS = {"missing_image": 1, "empty_file": 1, "bad_image": 2, "missing_caption": 1, "invalid_utf8": 1}
CSV_CAPTION_FAULTS = {"empty": 1, "invalid_utf8": 1}  # what `clipkd concepts build` sees of the same CSV
# Shards: a good one, one with five bad samples, one not a tar, one truncated inside sample TRUNCATED_AT, one empty.
SHARD_FAULTS = {"bad_image": 1, "missing_caption": 1, "invalid_utf8": 1, "empty_file": 2, "missing_image": 1,
                "not_a_tar": 1, "truncated_shard": 1}
SHARD_CAPTION_FAULTS = {"missing_caption": 1, "invalid_utf8": 1, "not_a_tar": 1, "empty_file": 1,
                        "truncated_shard": 1}
JSONL_FAULTS = {"invalid_utf8": 1, "missing_caption": 1, "missing_image": 1, "empty_file": 1, "bad_image": 1}
TRUNCATED_AT = 10


@dataclass(frozen=True)
class Planted:
    csv: Path
    csv_good: int  # images a command can use
    shards: Path
    shards_good: int
    jsonl: Path
    jsonl_good: int
    pool: Path  # the toyworld kinds as a concept pool, for `clipkd label`
    templates: Path


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def as_jpeg(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


def garbled_jpeg(image: bytes) -> bytes:
    """A JPEG header followed by garbage bytes."""
    data = as_jpeg(image)
    return data[:20] + bytes(range(256)) * (len(data) // 256)


def plant_csv(folder: Path, images: list[bytes], captions: list[str]) -> tuple[Path, int]:
    """`folder/data.csv` (filepath, title; tab-separated): a row per image of `images` (PNG or JPEG bytes) with its
    caption, then one row per fault of CSV_FAULTS (built from the first image); returns (the CSV, good images)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        name = f"images/good-{index}.{Image.open(io.BytesIO(image)).format.lower()}"
        (folder / name).write_bytes(image)
        rows.append(f"{name}\t{caption}".encode())
    planted = {"empty.png": b"", "truncated.png": truncated(images[0]), "garbled.jpg": garbled_jpeg(images[0]),
               "captionless.jpg": as_jpeg(images[0]), "badtext.jpg": as_jpeg(images[0])}
    for name, data in planted.items():
        (folder / "images" / name).write_bytes(data)
    rows += [b"images/missing.png\ta photo of something", b"images/empty.png\ta photo of something",
             b"images/truncated.png\ta photo of something", b"images/garbled.jpg\ta photo of something",
             b"images/captionless.jpg\t", b"images/badtext.jpg\ta caf\xe9 \xff in the street"]
    path = folder / "data.csv"
    path.write_bytes(b"filepath\ttitle\n" + b"\n".join(rows) + b"\n")
    return path, len(images)


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def plant_shard(samples: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
    """The samples with the first five spoiled: a truncated image, no `.txt`, a `.txt` that is not UTF-8, a
    zero-byte image, no image."""
    samples = {key: dict(members) for key, members in samples.items()}
    keys = list(samples)
    image = next(ext for ext in samples[keys[0]] if ext in ("png", "jpg"))
    samples[keys[0]][image] = truncated(samples[keys[0]][image])
    del samples[keys[1]]["txt"]
    samples[keys[2]]["txt"] = b"a caf\xe9 \xff in the street\n"
    samples[keys[3]][image] = b""
    del samples[keys[4]][image]
    return samples


def truncate_inside(path: Path, out: Path, sample: int) -> None:
    """`out`: the shard `path` cut in the middle of the first member of its `sample`-th sample."""
    with tarfile.open(path) as archive:
        members = archive.getmembers()
    keys = list(dict.fromkeys(member.name.partition(".")[0] for member in members))
    first = next(member for member in members if member.name.partition(".")[0] == keys[sample])
    out.write_bytes(path.read_bytes()[: first.offset_data + first.size // 2])


@pytest.fixture(scope="session")
def planted(toyworld_dir: Path, tmp_path_factory) -> Planted:
    from clipkd_dino.toyworld.generate import KINDS

    root = tmp_path_factory.mktemp("planted")
    train = toyworld_dir / "train"
    source_shards = sorted((train / "shards").glob("*.tar"))
    first = read_shard(source_shards[0])
    images = [members["png"] for members in list(first.values())[:10]]
    captions = [members["txt"].decode().splitlines()[0] for members in list(first.values())[:10]]
    csv, csv_good = plant_csv(root / "csv", images, captions)

    shards = root / "shards"
    shards.mkdir()
    shutil.copy(source_shards[0], shards / "shard-0.tar")
    write_shard(shards / "shard-1.tar", plant_shard(read_shard(source_shards[1])))
    (shards / "shard-2.tar").write_bytes(b"this is not a tar archive\n" * 40)
    truncate_inside(source_shards[2], shards / "shard-3.tar", TRUNCATED_AT)
    (shards / "shard-4.tar").write_bytes(b"")
    shards_good = len(first) + len(read_shard(source_shards[1])) - 5 + TRUNCATED_AT

    jsonl = root / "jsonl" / "val.jsonl"
    (root / "jsonl" / "images").mkdir(parents=True)
    lines = []
    for index, (image, caption) in enumerate(zip(images[:6], captions)):
        (root / "jsonl" / "images" / f"{index}.png").write_bytes(image)
        lines.append(json.dumps({"image": f"images/{index}.png", "captions": [caption]}).encode())
    (root / "jsonl" / "images" / "empty.png").write_bytes(b"")
    (root / "jsonl" / "images" / "truncated.png").write_bytes(truncated(images[0]))
    lines += [b'{"image": "images/0.png", "captions": ["a caf\xe9 \xff"]}',
              json.dumps({"image": "images/1.png", "captions": []}).encode(),
              json.dumps({"image": "images/missing.png", "captions": ["a photo"]}).encode(),
              json.dumps({"image": "images/empty.png", "captions": ["a photo"]}).encode(),
              json.dumps({"image": "images/truncated.png", "captions": ["a photo"]}).encode()]
    jsonl.write_bytes(b"\n".join(lines) + b"\n")

    pool = root / "pool.json"
    pool.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": k, "count": 100 - i} for i, k in enumerate(KINDS)]}))
    return Planted(csv, csv_good, shards, shards_good, jsonl, 6, pool,
                   toyworld_dir / "val" / "zeroshot" / "templates.json")
