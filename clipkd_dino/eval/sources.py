"""Readers of the public retrieval formats, and what identifies a data set.

- Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`): {"images": [{"filepath"?, "filename",
  "split", "sentences": [{"raw": ...}, ...]}, ...]}; the image is ROOT/filepath/filename (ROOT/filename without a
  filepath). COCO's 5k test split and Flickr30k's 1k test split are `split="test"`.
- Image-caption pairs: an open_clip CSV (rows grouped by image, so a CSV with several rows per image works too) or
  webdataset shards (each sample's `.txt` lines are its captions), with the syntax of `clipkd train`.
- Our toyworld retrieval JSONL: `retrieval.read_retrieval_file`.

Images are file paths or `ShardMember`s; the encoder opens both. Missing files are found by `missing_images` before
any encoding, so a benchmark that lost a file stops at once (or drops it under --skip-bad). Every other data fault
(docs/reliability.md) is also an error naming the file, or with `skip_bad` skipped and counted in the set's
`problems`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from clipkd_dino.data.faults import decode_captions
from clipkd_dino.data.samples import SampleRef, image_member, list_units, unit_samples
from clipkd_dino.data.tars import open_shard, read_member
from clipkd_dino.errors import UserError
from clipkd_dino.eval.retrieval import RetrievalSet
from clipkd_dino.eval.skips import skip_or_raise

SAMPLE_FAULTS = {"missing_image": "has no image member", "missing_caption": "has no caption",
                 "invalid_utf8": "caption is not UTF-8"}


@dataclass(frozen=True)
class ShardMember:
    """An image stored inside a webdataset shard: `size` bytes at `offset` of the tar file `shard`."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open_shard(self.shard) as handle:
            return read_member(handle, self.offset, self.size)


def read_karpathy(path: str | Path, images_root: str | Path, split: str = "test",
                  skip_bad: bool = False) -> RetrievalSet:
    """The images of `split` in a Karpathy split file, every caption (`sentences[].raw`) of each; an image without
    sentences is an error, or with `skip_bad` skipped as `missing_caption`."""
    path, root = Path(path), Path(images_root)
    records = _karpathy_images(path)
    names, captions, owner = [], [], []
    problems: Counter = Counter()
    for index, record in enumerate(records):
        where = f"{path}: images[{index}]"
        if not isinstance(record, dict) or "split" not in record or "filename" not in record:
            raise UserError(f"{where}: expected an object with 'filename' and 'split'")
        if record["split"] != split:
            continue
        sentences = [_raw_sentence(s, f"{where}.sentences") for s in record.get("sentences") or ()]
        if not sentences:
            skip_or_raise(problems, "missing_caption", f"{where}: no sentences", skip_bad)
            continue
        owner.extend([len(names)] * len(sentences))
        names.append("/".join(part for part in (record.get("filepath"), record["filename"]) if part))
        captions.extend(sentences)
    if not names:
        splits = sorted({str(r.get("split")) for r in records if isinstance(r, dict)})
        raise UserError(f"{path}: no image in split {split!r} (splits: {', '.join(splits)})")
    return RetrievalSet(path, [root / name for name in names], captions, owner, names, format="karpathy",
                        problems=dict(problems))


def read_pairs(source: str, data_format: str = "auto", separator: str = "\t", img_key: str = "filepath",
               caption_key: str = "title", skip_bad: bool = False) -> RetrievalSet:
    """Image-caption pairs from an open_clip CSV or webdataset shards: every image with all its captions.

    Raises a UserError naming the shard or the sample when a shard is empty, not a tar or truncated, a CSV row is not
    UTF-8, a sample has no image member or no caption, or its caption is not UTF-8; with `skip_bad` each is skipped
    and counted (`samples.py` names the reasons).
    """
    problems: Counter = Counter()
    names, images, captions, owner = [], [], [], []
    units = list_units(source, data_format, separator, img_key, caption_key)
    for unit in units:
        found: Counter = Counter()
        refs = unit_samples(unit, found)
        if found and not skip_bad:
            raise UserError(f"{unit.path}: {', '.join(found)} (a benchmark must not silently change; --skip-bad "
                            "skips it)")
        problems.update(found)
        for ref in refs:
            image, lines, reason = _csv_sample(ref) if unit.csv is not None else _shard_sample(unit.path, ref)
            if reason:
                skip_or_raise(problems, reason, f"{unit.path}: sample {ref.key!r} {SAMPLE_FAULTS[reason]}", skip_bad)
                continue
            owner.extend([len(names)] * len(lines))
            names.append(ref.key)
            images.append(image)
            captions.extend(lines)
    if not names:
        raise UserError(f"{source}: no samples")
    kind = "csv" if units[0].csv is not None else "webdataset"
    return RetrievalSet(Path(source), images, captions, owner, names, format=kind, problems=dict(problems))


def missing_images(images: Sequence) -> list[int]:
    """Indices of the image files that do not exist (shard members are checked when their shard is indexed)."""
    return [index for index, image in enumerate(images) if not isinstance(image, ShardMember)
            and not os.path.isfile(image)]


def content_digest(*parts: Any) -> str:
    """sha256 of the JSON of `parts`: what names a data set (or a cache entry) portably."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def files_digest(images: Iterable) -> str:
    """sha256 over each image's location, size and modification time: changes when any file does."""
    digest = hashlib.sha256()
    for image in images:
        location = image.shard if isinstance(image, ShardMember) else image
        try:
            stat = os.stat(location)
            version = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:  # the encoder will name the file
            version = "missing"
        digest.update(f"{os.path.abspath(location)}\0{image}\0{version}\n".encode())
    return digest.hexdigest()


def read_json(path: Path, kind: str = "file") -> Any:
    """The JSON value in `path`; a one-line UserError names the file (and line) when it is missing or invalid."""
    if not path.is_file():
        raise UserError(f"{kind} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 (byte {error.start})") from None


def _karpathy_images(path: Path) -> list:
    data = read_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: expected an object with an 'images' list (Karpathy split format)")
    return data["images"]


def _raw_sentence(sentence: Any, where: str) -> str:
    if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
        raise UserError(f"{where}: each sentence needs a 'raw' string")
    return sentence["raw"]


def _csv_sample(ref: SampleRef) -> tuple[str, list[str], str | None]:
    """(image path, captions, skip reason or None) of a CSV sample."""
    return ref.image_path, list(ref.captions), None if ref.captions else "missing_caption"


def _shard_sample(shard: str, ref: SampleRef) -> tuple[ShardMember | None, list[str], str | None]:
    """(image member, captions, skip reason or None) of a shard sample; the image is read by the encoder."""
    image_ext = image_member(ref)
    if image_ext is None:
        return None, [], "missing_image"
    lines, reason = decode_captions(ShardMember(shard, *ref.members["txt"]).read() if "txt" in ref.members else None)
    return ShardMember(shard, *ref.members[image_ext]), lines, reason


def check_images(data, skip_bad: bool = False):
    """`data` (a retrieval or zero-shot set) without its missing image files when `skip_bad` (recorded as skipped,
    `missing_image`); else a UserError naming the first missing file. Run it before loading a model: it only stats
    the files."""
    missing = missing_images(data.images)
    if missing and not skip_bad:
        raise UserError(f"image file not found: {data.images[missing[0]]} ({len(missing)} missing; "
                        "--skip-bad drops them with their captions)")
    return data.without(dict.fromkeys(missing, "missing_image"))
