"""Image-caption training data from open_clip-style CSV files or webdataset shards.

Bad samples (unreadable images, empty captions, broken shards) never stop training: they are dropped from the
batch and counted per reason; the counts travel with each batch (`batch["skipped"]`) so the trainer can report
them, even from DataLoader worker processes.

- CSV: every row is visited once per epoch (DistributedSampler); a resumed run skips the batches already done.
- webdataset: shards are sampled with replacement (open_clip's "resampled" mode), so every process always has
  data and an epoch is a fixed number of steps (`num_samples // global batch`). A `.txt` member with several lines
  holds several captions: one is drawn at random at each visit. The stream of an epoch is a pure function of
  (seed, rank, epoch): the shard draws and the sample shuffle buffer are seeded from them, and batch b is the raw
  samples at positions [b * batch_size, (b + 1) * batch_size) of the stream (a skipped sample keeps its place, so
  a batch may hold fewer valid samples). The caption, the view and the random augmentation of a sample are drawn
  from (seed, rank, epoch, its position), not from a running generator. So a resumed epoch (`skip_batches`)
  yields exactly the batches that the uninterrupted epoch yields after the first `skip_batches` ones, whatever
  the number of DataLoader workers: every worker reads the cheap undecoded stream and decodes only the samples of
  its own batches (those the DataLoader takes from it in turn); skipped batches are never decoded, and their bad
  samples and broken shard members are not counted again.

Each batch also carries the samples' identities (`keys`: `SOURCE/KEY`, see `identity.py`, with the webdataset
`__key__` or the CSV image path as written; `ids`: their int64 hashes), the index of the caption drawn among the
sample's captions, and the augmentation view drawn (-1 for the model's own random transform). With `views` set
(distillation from a teacher-embedding cache) the image of a sample is view k of `views`, k drawn in
[0, num_views), so the cached teacher embedding of exactly those pixels can be looked up. A `targets` callable
(e.g. the cache and label lookups of a distiller) completes each batch in the loader workers: it adds per-sample
tensors and may drop samples it cannot serve, counting them in `skipped`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, get_worker_info

from clipkd_dino.data.faults import BadSample, decode_captions, is_utf8, load_image, shard_fault
from clipkd_dino.data.identity import csv_source, identity_hashes, sample_identity, shard_sources
from clipkd_dino.data.views import ViewSpec
from clipkd_dino.errors import ConfigError, UserError
from clipkd_dino.runtime import init_data_worker

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


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


def load_pair(image: bytes | str, caption: str, images: PairImages, tokenizer, key: str, caption_index: int,
              view: int) -> Pair | Skipped:
    """The pair (image tensor, token ids, its key, caption index and view) of an image (encoded bytes or a file
    path) and a caption, or `Skipped(reason)` with the reasons of `faults.load_image` and "missing_caption"."""
    caption = caption.strip()
    if not caption:
        return Skipped("missing_caption")
    try:
        pixels = images(load_image(image), key, view)
    except BadSample as bad:
        log.debug("skipping %s: %s", key, bad)
        return Skipped(bad.reason)
    return Pair(pixels, tokenizer([caption])[0], key, caption_index, view)


BatchTargets = Callable[[dict], dict]  # completes a collated batch (see the module doc)


def collate_pairs(samples: list, also_skipped: Counter | None = None, targets: BatchTargets | None = None) -> dict:
    """Stack the valid samples; count the skipped ones, plus `also_skipped` (e.g. broken shard members); then
    `targets(batch)` when given."""
    valid = [s for s in samples if not isinstance(s, Skipped)]
    skipped = Counter(s.reason for s in samples if isinstance(s, Skipped))
    skipped.update(also_skipped or {})
    images = torch.stack([s.pixels for s in valid]) if valid else torch.empty(0)
    texts = torch.stack([s.tokens for s in valid]) if valid else torch.empty(0, dtype=torch.long)
    keys = [s.key for s in valid]
    batch = {"images": images, "texts": texts, "keys": keys, "ids": torch.from_numpy(identity_hashes(keys)),
             "caption_index": torch.tensor([s.caption_index for s in valid], dtype=torch.long),
             "view": torch.tensor([s.view for s in valid], dtype=torch.long), "skipped": dict(skipped)}
    return targets(batch) if targets is not None else batch


PER_SAMPLE = ("images", "texts", "keys", "ids", "caption_index", "view")


def select_samples(batch: dict, keep) -> dict:
    """The batch restricted to the samples where `keep` (bool [B]) is true."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    selected = {name: batch[name][keep] for name in PER_SAMPLE if name != "keys"}
    return batch | selected | {"keys": [key for key, kept in zip(batch["keys"], keep.tolist()) if kept]}


class CsvPairs(Dataset):
    """Rows of an open_clip-style CSV: an image path column and a caption column.

    Relative image paths are resolved against the CSV file's folder. A row's key is its image path as written (its
    identity `STEM/PATH`, STEM the CSV file's); its caption index counts the usable captions of the same image in
    the rows before it (as the teacher cache orders them). A row whose bytes are not UTF-8 is kept and skipped at each visit (`invalid_utf8`), like any bad sample.
    The view of a row is drawn from (seed, epoch, row), so a resumed epoch replays the same views.
    """

    def __init__(self, path: str, images: PairImages, tokenizer, img_key="filepath", caption_key="title",
                 separator="\t", seed: int = 0):
        self.path, self.pair_images, self.tokenizer, self.seed, self.epoch = Path(path), images, tokenizer, seed, 0
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.DictReader(handle, delimiter=separator)
            missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(
                    f"{path}: column {missing[0]!r} not found (columns: {reader.fieldnames}); "
                    "set data.csv_img_key / data.csv_caption_key / data.csv_separator"
                )
            rows = [(row[img_key], row[caption_key] or "") for row in reader]
        source = csv_source(path)
        self.keys = [sample_identity(source, image) for image, _ in rows]
        self.images = [str(self.path.parent / image) for image, _ in rows]
        self.captions = [caption for _, caption in rows]
        self.utf8 = [is_utf8(image + caption) for image, caption in rows]
        seen: Counter = Counter()
        self.caption_index = []
        for (key, caption), utf8 in zip(rows, self.utf8):
            self.caption_index.append(seen[key])
            seen[key] += bool(caption.strip()) and utf8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        digest = hashlib.sha256(f"{self.seed}\0{self.epoch}\0{index}".encode()).digest()
        view = self.pair_images.draw_view(random.Random(digest))
        if not self.utf8[index]:
            return Skipped("invalid_utf8")
        return load_pair(self.images[index], self.captions[index], self.pair_images, self.tokenizer,
                         self.keys[index], self.caption_index[index], view)


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


def _draws(*parts) -> random.Random:
    """A generator seeded by a hash of `parts`: the same draws in every process and on every run."""
    return random.Random(hashlib.sha256("\0".join(str(part) for part in parts).encode()).digest())


_END = object()


def _shuffled(samples: Iterator, bufsize: int, initial: int, rng: random.Random) -> Iterator:
    """webdataset's buffer shuffle (`wds.shuffle`), drawing only from `rng` (no worker id, pid or time)."""
    initial = min(initial, bufsize)
    buffer: list = []

    def pick():
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        return buffer.pop()

    for sample in samples:
        buffer.append(sample)
        if len(buffer) < bufsize:  # while filling, take two samples for each one given out
            extra = next(samples, _END)
            if extra is not _END:
                buffer.append(extra)
        if len(buffer) >= initial:
            yield pick()
    while buffer:
        yield pick()


def _decode_webdataset_sample(sample: dict, identity: str, images: PairImages, tokenizer, draws: random.Random):
    """The pair of a raw webdataset sample; view, torch seed (random augmentation) and caption come from `draws`."""
    view = images.draw_view(draws)
    torch_seed = draws.getrandbits(63)
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_key is None:
        return Skipped("missing_image")
    captions, problem = decode_captions(sample.get("txt"))
    if problem:
        return Skipped(problem)
    index = draws.randrange(len(captions))
    state = torch.get_rng_state()  # the model's random transform draws from torch's generator: seed it per sample
    try:
        torch.default_generator.manual_seed(torch_seed)
        return load_pair(sample[image_key], captions[index], images, tokenizer, identity, index, view)
    finally:
        torch.set_rng_state(state)


class WebdatasetEpoch(IterableDataset):
    """Batches [skip, stop) of epoch `epoch` of process `rank`'s webdataset stream, each collated in the worker.

    The raw (undecoded) stream is a pure function of (seed, rank, epoch): shards drawn with replacement, their
    samples through a seeded shuffle buffer. Batch b holds the samples at stream positions [b * B, (b + 1) * B).
    Every DataLoader worker reads the raw stream and decodes only the batches it owns: batch skip + i belongs to
    worker i % workers, the order in which a DataLoader takes batches from its workers, starting at worker 0.
    A sample's draws (caption, view, random augmentation) come from (seed, rank, epoch, its position). Broken shard
    members are counted in the batch of the next sample read after them, by that batch's worker only.
    """

    def __init__(self, urls: list[str], images: PairImages, tokenizer, batch_size: int, shuffle_buffer: int,
                 seed: int, rank: int, epoch: int, skip: int, stop: int, targets: BatchTargets | None = None) -> None:
        self.urls, self.images, self.tokenizer, self.batch_size = urls, images, tokenizer, batch_size
        self.shuffle_buffer, self.seed, self.rank, self.epoch = shuffle_buffer, seed, rank, epoch
        self.skip, self.stop, self.targets = skip, stop, targets
        self.sources = {shard.url: shard.source for shard in shard_sources(urls)}

    def raw_samples(self) -> Iterator[tuple[dict, list[tuple[str, Exception]]]]:
        """(raw sample, (reason, error) of the shard faults met since the previous one), endlessly, in stream
        order. Shards are read one at a time, so a fault belongs to the shard drawn last."""
        from webdataset.tariterators import tarfile_samples

        errors: list[tuple[str, Exception]] = []
        shard_rng = _draws("shards", self.seed, self.rank, self.epoch)
        max_draws = max(1000, 20 * len(self.urls))
        draws_without_sample = 0
        current, truncated = "", False  # the shard drawn last; whether the last fault met was its truncation

        def shards() -> Iterator[dict]:
            nonlocal draws_without_sample, current
            while True:
                draws_without_sample += 1
                if draws_without_sample > max_draws:
                    raise UserError(f"webdataset: no readable sample in {max_draws} shards drawn in a row from "
                                    f"{len(self.urls)} shards ({self.urls[0]}, ...): are they all broken?")
                current = self.urls[shard_rng.randrange(len(self.urls))]
                yield {"url": current}

        def handler(error: Exception) -> bool:
            nonlocal truncated
            reason = shard_fault(current)
            errors.append((reason, error))
            truncated = reason == "truncated_shard"
            return True

        def samples() -> Iterator[dict]:
            nonlocal draws_without_sample, truncated
            for sample in tarfile_samples(shards(), handler=handler):
                draws_without_sample = 0
                cut, truncated = truncated, False
                if cut and not ("txt" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)):
                    continue  # the sample the shard's end cut in two: part of its truncated_shard fault
                yield sample

        shuffle_rng = _draws("shuffle", self.seed, self.rank, self.epoch)
        for sample in _shuffled(samples(), self.shuffle_buffer, min(self.shuffle_buffer, 500), shuffle_rng):
            met = errors.copy()
            errors.clear()
            yield sample, met

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        owned = range(self.skip + worker, self.stop, workers)
        if not owned:
            return
        size = self.batch_size
        samples: list = []
        counts: Counter = Counter()
        stream = self.raw_samples()
        for position, (sample, errors) in enumerate(stream):
            batch = position // size
            if batch > owned[-1]:
                break
            if batch not in owned:
                continue  # not decoded: another worker's batch, or one done before a resume
            for reason, error in errors:
                counts[reason] += 1
                log.warning("skipping unreadable webdataset data (%s): %s", reason, error)
            draws = _draws(self.seed, self.rank, self.epoch, position)
            identity = sample_identity(self.sources[sample["__url__"]], sample["__key__"])
            samples.append(_decode_webdataset_sample(sample, identity, self.images, self.tokenizer, draws))
            if len(samples) == size:
                yield collate_pairs(samples, counts, self.targets)
                samples, counts = [], Counter()
        stream.close()


def _as_is(batch: dict) -> dict:
    return batch


class TrainData:
    """The training stream of one process: a DataLoader plus how many batches make an epoch."""

    def __init__(self, cfg, images: PairImages | Callable, tokenizer, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, targets: BatchTargets | None = None) -> None:
        images = images if isinstance(images, PairImages) else PairImages(images)
        self.cfg, self.images, self.tokenizer, self.targets = cfg, images, tokenizer, targets
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

    def epoch_batches(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """The batches of `epoch` after the first `skip_batches` ones."""
        if self.format == "csv":
            yield from self._csv_loader(epoch, skip_batches)
        elif skip_batches < self.steps_per_epoch:
            yield from self._webdataset_loader(epoch, skip_batches)

    def _loader(self, dataset, epoch: int, **kwargs) -> DataLoader:
        """Its own generator (worker seeds) leaves the global RNG, and so dropout, the same after a resume."""
        workers = self.cfg.workers
        options = {"batch_size": self.batch_size, "collate_fn": functools.partial(collate_pairs, targets=self.targets)
                   } | kwargs
        return DataLoader(dataset, num_workers=workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
                          worker_init_fn=init_data_worker,
                          generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch), **options)

    def _csv_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        self.dataset.epoch = epoch
        return self._loader(self.dataset, epoch, sampler=SkipFirst(sampler, skip_batches * self.batch_size),
                            drop_last=True)

    def _webdataset_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        dataset = WebdatasetEpoch(self.urls, self.images, self.tokenizer, self.batch_size, self.cfg.shuffle_buffer,
                                  self.seed, self.rank, epoch, skip_batches, self.steps_per_epoch, self.targets)
        return self._loader(dataset, epoch, batch_size=None, collate_fn=_as_is)  # batches come collated
