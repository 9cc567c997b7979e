"""Image-caption training data from open_clip-style CSV files or webdataset shards.

Bad samples (unreadable images, empty captions, broken shards) never stop training: they are dropped from the
batch and counted per reason; the counts travel with each batch (`batch["skipped"]`) so the trainer can report
them, even from DataLoader worker processes.

- CSV: every row is visited once per epoch (DistributedSampler); a resumed run skips the batches already done.
- webdataset: shards are sampled with replacement (open_clip's "resampled" mode), so every process always has
  data and an epoch is a fixed number of steps (`num_samples // global batch`). A `.txt` member with several lines
  holds several captions: one is drawn at random at each visit.

Each batch also carries the samples' keys (webdataset `__key__`, or the CSV image path as written), the index of the
caption drawn among the sample's captions, and the augmentation view drawn (-1 for the model's own random
transform). With `views` set (distillation from a teacher-embedding cache) the image of a sample is view k of
`views`, k drawn in [0, num_views), so the cached teacher embedding of exactly those pixels can be looked up.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from clipkd_dino.data.views import ViewSpec
from clipkd_dino.errors import ConfigError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_worker_skips: Counter = Counter()  # per worker process; emptied into each batch by `collate_pairs`


@dataclass
class Skipped:
    reason: str


@dataclass
class Pair:
    pixels: torch.Tensor
    tokens: torch.Tensor
    key: str
    caption_index: int
    view: int


@dataclass(frozen=True)
class PairImages:
    """How a pair's image is made: `transform(image)`, or view k of `views` when replaying cached views."""

    transform: Callable
    views: ViewSpec | None = None
    num_views: int = 0

    def __call__(self, image: Image.Image, key: str, view: int) -> torch.Tensor:
        return self.views(image, key, view) if self.views is not None else self.transform(image)

    def draw_view(self, rng: random.Random) -> int:
        return rng.randrange(self.num_views) if self.views is not None else -1


def expand_shards(pattern: str) -> list[str]:
    """Shard paths from brace patterns joined by '::' (open_clip convention); a folder stands for its *.tar files."""
    urls = []
    for part in pattern.split("::"):
        if Path(part).is_dir():
            urls.extend(sorted(str(p) for p in Path(part).glob("*.tar")))
        else:
            urls.extend(braceexpand(part))
    return urls


def data_format(path: str, configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    return "csv" if path.lower().endswith((".csv", ".tsv")) else "webdataset"


def check_sources(pattern: str, configured_format: str = "auto", key: str = "data.train") -> None:
    """One-line ConfigError naming `key` and the path when a CSV file or a shard does not exist."""
    paths = [pattern] if data_format(pattern, configured_format) == "csv" else expand_shards(pattern)
    if not paths:
        raise ConfigError(f"config key {key!r}: no shards in {pattern}")
    for path in paths:
        if "://" not in path and not Path(path).is_file():
            raise ConfigError(f"config key {key!r}: file not found: {path}")


def webdataset_num_samples(urls: list[str], configured: int | None) -> int:
    """The configured count, else the sum over `sizes.json` files beside the shards."""
    if configured:
        return configured
    total = 0
    for url in urls:
        sizes_file = Path(url).parent / "sizes.json"
        sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
        if Path(url).name not in sizes:
            raise ConfigError(
                f"config key 'data.num_samples' is needed: {url} is not listed in {sizes_file}"
            )
        total += int(sizes[Path(url).name])
    return total


def load_pair(image: Callable[[], Image.Image], caption: str, images: PairImages, tokenizer, key: str,
              caption_index: int, view: int) -> Pair | Skipped:
    """The pair (image tensor, token ids, its key, caption index and view) or `Skipped(reason)`."""
    caption = caption.strip()
    if not caption:
        return Skipped("empty_caption")
    try:
        pixels = images(image(), key, view)
    except FileNotFoundError:
        return Skipped("missing_image")
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for truncated or invalid files
        log.debug("unreadable image: %s", error)
        return Skipped("bad_image")
    return Pair(pixels, tokenizer([caption])[0], key, caption_index, view)


def collate_pairs(samples: list) -> dict:
    """Stack the valid samples; count the skipped ones (and those reported by the webdataset handler)."""
    valid = [s for s in samples if not isinstance(s, Skipped)]
    skipped = Counter(s.reason for s in samples if isinstance(s, Skipped))
    skipped.update(_worker_skips)
    _worker_skips.clear()
    images = torch.stack([s.pixels for s in valid]) if valid else torch.empty(0)
    texts = torch.stack([s.tokens for s in valid]) if valid else torch.empty(0, dtype=torch.long)
    return {"images": images, "texts": texts, "keys": [s.key for s in valid],
            "caption_index": torch.tensor([s.caption_index for s in valid], dtype=torch.long),
            "view": torch.tensor([s.view for s in valid], dtype=torch.long), "skipped": dict(skipped)}


class CsvPairs(Dataset):
    """Rows of an open_clip-style CSV: an image path column and a caption column.

    Relative image paths are resolved against the CSV file's folder. A row's key is its image path as written; its
    caption index counts the non-empty captions of the same image in the rows before it. The view of a row is drawn
    from (seed, epoch, row), so a resumed epoch replays the same views.
    """

    def __init__(self, path: str, images: PairImages, tokenizer, img_key="filepath", caption_key="title",
                 separator="\t", seed: int = 0):
        self.path, self.pair_images, self.tokenizer, self.seed, self.epoch = Path(path), images, tokenizer, seed, 0
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=separator)
            missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(
                    f"{path}: column {missing[0]!r} not found (columns: {reader.fieldnames}); "
                    "set data.csv_img_key / data.csv_caption_key / data.csv_separator"
                )
            rows = [(row[img_key], row[caption_key] or "") for row in reader]
        self.keys = [image for image, _ in rows]
        self.images = [str(self.path.parent / image) for image, _ in rows]
        self.captions = [caption for _, caption in rows]
        seen: Counter = Counter()
        self.caption_index = []
        for key, caption in rows:
            self.caption_index.append(seen[key])
            seen[key] += bool(caption.strip())

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        digest = hashlib.sha256(f"{self.seed}\0{self.epoch}\0{index}".encode()).digest()
        view = self.pair_images.draw_view(random.Random(digest))
        return load_pair(lambda: Image.open(self.images[index]), self.captions[index], self.pair_images,
                         self.tokenizer, self.keys[index], self.caption_index[index], view)


class SkipFirst(Sampler):
    """Yields the indices of `sampler` after the first `skip` of them (to resume inside an epoch)."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        indices = iter(self.sampler)
        for _ in range(self.skip):
            next(indices, None)
        return indices

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _count_and_continue(error: Exception) -> bool:
    """webdataset handler: count a broken shard or tar member, warn once per error, keep going."""
    _worker_skips["bad_shard_member"] += 1
    log.warning("skipping unreadable webdataset data: %s", error)
    return True


def _decode_webdataset_sample(sample: dict, images: PairImages, tokenizer, rng: random.Random):
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_key is None or "txt" not in sample:
        return Skipped("missing_member")
    try:
        captions = [line for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        return Skipped("bad_caption")
    index = rng.randrange(len(captions)) if captions else 0
    return load_pair(lambda: Image.open(io.BytesIO(sample[image_key])), captions[index] if captions else "", images,
                     tokenizer, sample["__key__"], index, images.draw_view(rng))


class TrainData:
    """The training stream of one process: a DataLoader plus how many batches make an epoch."""

    def __init__(self, cfg, images: PairImages | Callable, tokenizer, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        images = images if isinstance(images, PairImages) else PairImages(images)
        self.cfg, self.images, self.tokenizer = cfg, images, tokenizer
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.format = data_format(cfg.train, cfg.format)
        if self.format == "csv":
            self.dataset = CsvPairs(cfg.train, images, tokenizer, cfg.csv_img_key, cfg.csv_caption_key,
                                    cfg.csv_separator, seed)
            self.num_samples = len(self.dataset)
        else:
            self.urls = expand_shards(cfg.train)
            self.num_samples = webdataset_num_samples(self.urls, cfg.num_samples)
        self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.train has {self.num_samples} samples, fewer than one global batch "
                f"({batch_size} x {world_size} processes): lower train.batch_size"
            )
        self._stream: Iterator | None = None

    def epoch_batches(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """The batches of `epoch` after the first `skip_batches` ones."""
        count = self.steps_per_epoch - skip_batches
        if self.format == "csv":
            yield from self._csv_loader(epoch, skip_batches)
            return
        if self._stream is None:
            self._stream = iter(self._webdataset_loader(epoch, skip_batches))
        for _ in range(count):
            yield next(self._stream)

    def _loader(self, dataset, epoch: int, **kwargs) -> DataLoader:
        """Its own generator (worker seeds) leaves the global RNG, and so dropout, the same after a resume."""
        workers = self.cfg.workers
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=workers, collate_fn=collate_pairs,
                          persistent_workers=False, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch), **kwargs)

    def _csv_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        self.dataset.epoch = epoch
        return self._loader(self.dataset, epoch, sampler=SkipFirst(sampler, skip_batches * self.batch_size),
                            drop_last=True)

    def _webdataset_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        import webdataset as wds

        seed = hash((self.seed, self.rank, epoch, skip_batches)) % 2**31  # reproducible, new on resume
        rng = random.Random(seed)  # caption and view draws (each DataLoader worker has its own copy)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, deterministic=True, seed=seed),
            wds.tarfile_to_samples(handler=_count_and_continue),
            wds.shuffle(self.cfg.shuffle_buffer, initial=min(self.cfg.shuffle_buffer, 500), seed=seed),
            wds.map(lambda sample: _decode_webdataset_sample(sample, self.images, self.tokenizer, rng)),
        )
        return self._loader(pipeline, epoch)
