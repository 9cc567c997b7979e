"""Image-caption training data from open_clip-style CSV files or webdataset shards.

Bad samples (unreadable images, empty captions, broken shards) never stop training: they are dropped from the
batch and counted per reason; the counts travel with each batch (`batch["skipped"]`) so the trainer can report
them, even from DataLoader worker processes.

- CSV: every row is visited once per epoch (DistributedSampler); a resumed run skips the batches already done.
- webdataset: shards are sampled with replacement (open_clip's "resampled" mode), so every process always has
  data and an epoch is a fixed number of steps (`num_samples // global batch`). A `.txt` member with several lines
  holds several captions: one is drawn at random at each visit. An epoch of a process is W streams, one per
  DataLoader worker (W = `data.workers`, 1 without workers): each reads its own shard draws, each shard visit
  once, in order, through its own shuffle buffer (`ShardStream`), so the bytes read per epoch are the data's size
  whatever W. Everything is a pure function of (seed, rank, epoch, stream) and positions: the shard draws, the
  buffer's picks, and each sample's caption, view and random augmentation. Batch b is batch b // W of stream
  b % W (a skipped sample keeps its place, so a batch may hold fewer valid samples). Each batch carries its
  stream's cursor (a few ints and the shuffle buffer's pointers); a resumed epoch restores every stream from the
  cursors of the last batches done, reading only the buffered samples and the current shard's index, and yields
  exactly the batches the uninterrupted epoch yields after them, as long as the number of workers and of
  processes is the same (otherwise each stream is replayed from the epoch's start, undecoded: still exact for the
  new numbers, at the cost of reading the prefix). Skipped batches are never decoded, and their bad samples and
  broken shard members are not counted again.

Each batch also carries the samples' identities (`keys`: `SOURCE/KEY`, see `identity.py`, with the webdataset
`__key__` or the CSV image path as written; `ids`: their int64 hashes), the index of the caption drawn among the
sample's captions, and the augmentation view drawn (-1 for the model's own random transform). With `views` set
(distillation from a teacher-embedding cache) the image of a sample is view k of `views`, k drawn in
[0, num_views), so the cached teacher embedding of exactly those pixels can be looked up. A `targets` callable
(e.g. the cache and label lookups of a distiller) completes each batch in the loader workers: it adds per-sample
tensors and may drop samples it cannot serve, counting them in `skipped`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, get_worker_info

from clipkd_dino.data.csv_table import CsvTable
from clipkd_dino.data.faults import BadSample, load_image
from clipkd_dino.data.identity import Shard, csv_source, identity_hashes, sample_identity, shard_sources
from clipkd_dino.data.samples import RawSample, SampleRef, data_format, expand_shards, index_shard, read_sample
from clipkd_dino.data.views import ViewSpec
from clipkd_dino.errors import ConfigError, UserError
from clipkd_dino.runtime import init_data_worker

log = logging.getLogger(__name__)
SHUFFLE_INITIAL = 500  # samples in a stream's shuffle buffer before the first is given out (webdataset's default)


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
    """How a pair's image is made: `transform(image)`, or the uint8 pixels of view k of `views` when replaying
    cached views."""

    transform: Callable
    views: ViewSpec | None = None
    num_views: int = 0

    def __call__(self, image: Image.Image, key: str, view: int) -> torch.Tensor:
        return self.views.pixels(image, key, view) if self.views is not None else self.transform(image)

    def draw_view(self, rng: random.Random) -> int:
        return rng.randrange(self.num_views) if self.views is not None else -1


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
    the rows before it (as the teacher cache orders them). A row whose bytes are not UTF-8 is kept and skipped at
    each visit (`invalid_utf8`), like any bad sample. The rows are a `CsvTable` (numpy arrays, no object per row),
    which forked loader workers share.
    The view and the random augmentation of a row are drawn from (seed, epoch, row), so a resumed epoch replays
    them, with or without loader workers.
    """

    def __init__(self, path: str, images: PairImages, tokenizer, img_key="filepath", caption_key="title",
                 separator="\t", seed: int = 0):
        self.path, self.pair_images, self.tokenizer, self.seed, self.epoch = Path(path), images, tokenizer, seed, 0
        self.source = csv_source(path)
        self.table = CsvTable.read(path, separator, img_key, caption_key,
                                   hint="; set data.csv_img_key / data.csv_caption_key / data.csv_separator")

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        draws = _draws(self.seed, self.epoch, index)
        view, torch_seed = self.pair_images.draw_view(draws), draws.getrandbits(63)
        if not self.table.utf8(index):
            return Skipped("invalid_utf8")
        image = self.table.image_path(index)
        with _torch_seeded(torch_seed):
            return load_pair(str(self.path.parent / image), self.table.caption(index), self.pair_images,
                             self.tokenizer, sample_identity(self.source, image), int(self.table.caption_index[index]),
                             view)


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


def _hashed(*parts) -> int:
    """A 64-bit integer from a hash of `parts`: the same in every process and on every run."""
    return int.from_bytes(hashlib.sha256("\0".join(str(part) for part in parts).encode()).digest()[:8], "little")


Pointer = tuple[int, int]  # (shard draw, sample index within that shard): where a raw sample of a stream was read


class ShardStream:
    """One stream of raw webdataset samples: shards drawn with replacement, each read once per visit in order
    through its index (`samples.index_shard`, the tar reader of every command), through a shuffle buffer.

    Draw d reads shard `shards[hash(key, d) % n]`; the sample given out at position p is the buffer's entry
    `hash(key, p) % len(buffer)`, where `key` is (seed, rank, epoch, stream). So the whole state after any
    position is small (a `cursor`: the position, the next draw and sample, the buffer's pointers), and `restore`
    rebuilds it by reading only the buffered samples and the current shard's index, not the stream's prefix.
    Faults (broken, empty, truncated shards) are counted when a shard is first indexed in the stream, never on a
    restore; `faults()` hands over those met since its last call.
    """

    def __init__(self, shards: list[Shard], bufsize: int, key: tuple, cursor: dict | None = None) -> None:
        self.shards, self.bufsize, self.key = shards, max(1, bufsize), key
        self.initial = min(self.bufsize, SHUFFLE_INITIAL)
        self.max_empty_draws = max(1000, 20 * len(shards))
        self.position, self.draw, self.next, self.empty_draws = 0, -1, 0, 0
        self.refs: tuple[SampleRef, ...] = ()
        self.buffer: list[tuple[Pointer, RawSample, str]] = []
        self._faults: Counter = Counter()
        self._open: tuple[str, BinaryIO] | None = None
        if cursor is not None:
            self._restore(cursor)

    def shard(self, draw: int) -> Shard:
        return self.shards[_hashed(*self.key, "shard", draw) % len(self.shards)]

    def take(self) -> tuple[RawSample, str]:
        """The next raw sample given out and its identity (the stream is endless)."""
        for _ in range(2):  # while filling, read two samples for each one given out
            if len(self.buffer) < self.bufsize:
                self.buffer.append(self._read_next())
        while len(self.buffer) < self.initial:
            self.buffer.append(self._read_next())
        index = _hashed(*self.key, "pick", self.position) % len(self.buffer)
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        self.position += 1
        _, raw, identity = self.buffer.pop()
        return raw, identity

    def cursor(self) -> dict:
        """The state after the samples given out so far (small tensors and ints: cheap to ship from a worker)."""
        pointers = torch.tensor([pointer for pointer, _, _ in self.buffer], dtype=torch.long).view(-1, 2)
        return {"position": self.position, "draw": self.draw, "next": self.next, "empty_draws": self.empty_draws,
                "buffer": pointers}

    def faults(self) -> Counter:
        met, self._faults = self._faults, Counter()
        return met

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def _read_next(self) -> tuple[Pointer, RawSample, str]:
        while self.next >= len(self.refs):
            self.draw += 1
            self.empty_draws += 1
            if self.empty_draws > self.max_empty_draws:
                raise UserError(f"webdataset: no readable sample in {self.max_empty_draws} shards drawn in a row "
                                f"from {len(self.shards)} shards ({self.shards[0].url}, ...): are they all broken?")
            self.refs, self.next = index_shard(self.shard(self.draw).url, self._faults), 0
        pointer = (self.draw, self.next)
        self.next += 1
        self.empty_draws = 0
        return pointer, *self._read(pointer, self.refs)

    def _read(self, pointer: Pointer, refs: tuple[SampleRef, ...]) -> tuple[RawSample, str]:
        shard = self.shard(pointer[0])
        if self._open is None or self._open[0] != shard.url:
            self.close()
            self._open = (shard.url, open(shard.url, "rb"))
        ref = refs[pointer[1]]
        return read_sample(shard.url, ref, self._open[1]), sample_identity(shard.source, ref.key)

    def _restore(self, cursor: dict) -> None:
        self.position, self.draw = cursor["position"], cursor["draw"]
        self.next, self.empty_draws = cursor["next"], cursor["empty_draws"]
        indexes: dict[int, tuple[SampleRef, ...]] = {}

        def refs(draw: int) -> tuple[SampleRef, ...]:  # faults of these shards were counted on their first read
            if draw not in indexes:
                indexes[draw] = index_shard(self.shard(draw).url, Counter())
            return indexes[draw]

        pointers = [tuple(row) for row in cursor["buffer"].tolist()]
        self.buffer = [(pointer, *self._read(pointer, refs(pointer[0]))) for pointer in pointers]
        self.refs = refs(self.draw) if self.draw >= 0 else ()


def _decode_raw(raw: RawSample, identity: str, images: PairImages, tokenizer, draws: random.Random):
    """The pair of a raw webdataset sample; view, torch seed (random augmentation) and caption come from `draws`."""
    view = images.draw_view(draws)
    torch_seed = draws.getrandbits(63)
    if raw.problem:
        return Skipped(raw.problem)
    index = draws.randrange(len(raw.captions))
    with _torch_seeded(torch_seed):
        return load_pair(raw.image, raw.captions[index], images, tokenizer, identity, index, view)


@contextlib.contextmanager
def _torch_seeded(seed: int) -> Iterator[None]:
    """The model's random transform draws from torch's generator: seed it per sample, and give the caller's state
    back (so the stream is the same in a worker or in the training process, and leaves dropout's draws alone)."""
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)
        yield
    finally:
        torch.set_rng_state(state)


class WebdatasetEpoch(IterableDataset):
    """Batches [skip, stop) of epoch `epoch` of process `rank`, each collated in a DataLoader worker.

    The epoch is W streams (W = the number of loader workers, 1 without): global batch b is batch b // W of stream
    b % W, the samples at positions [(b // W) B, (b // W + 1) B) of that `ShardStream`. Each stream is read by one
    worker, so every shard visit is read once, by one process. The DataLoader takes batches from its workers in
    turn starting at worker 0, so worker i serves stream (i + skip) % W. Each batch carries its stream's `cursor`;
    with `cursors` (stream -> the cursor after the last batch done), a resumed epoch restores every stream instead
    of reading its prefix. Without a cursor for a stream (another number of workers or processes before the
    resume), the stream is replayed from its start without decoding: exact, at the cost of reading the prefix.
    A sample's draws (caption, view, random augmentation) come from (seed, rank, epoch, stream, its position).
    Faults met while a batch's samples are read are counted in that batch.
    """

    def __init__(self, urls: list[str], images: PairImages, tokenizer, batch_size: int, shuffle_buffer: int,
                 seed: int, rank: int, epoch: int, skip: int, stop: int, targets: BatchTargets | None = None,
                 cursors: dict[int, dict] | None = None) -> None:
        self.shards, self.images, self.tokenizer, self.batch_size = shard_sources(urls), images, tokenizer, batch_size
        self.shuffle_buffer, self.seed, self.rank, self.epoch = shuffle_buffer, seed, rank, epoch
        self.skip, self.stop, self.targets, self.cursors = skip, stop, targets, cursors or {}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream_id = (worker + self.skip) % workers
        owned = range(self.skip + (stream_id - self.skip) % workers, self.stop, workers)
        if not owned:
            return
        key = (self.seed, self.rank, self.epoch, stream_id)
        cursor = self.cursors.get(stream_id)
        if cursor is not None and (cursor["workers"], cursor["batch"] + workers) != (workers, owned[0]):
            cursor = None  # saved with another number of workers, or not the batch before: replay instead
        stream = ShardStream(self.shards, self.shuffle_buffer, key, cursor)
        try:
            if cursor is None:
                for _ in range(owned[0] // workers * self.batch_size):  # replay the prefix, nothing decoded
                    stream.take()
                stream.faults()
            for batch in owned:
                samples = []
                for _ in range(self.batch_size):
                    raw, identity = stream.take()
                    draws = _draws(*key, stream.position - 1)
                    samples.append(_decode_raw(raw, identity, self.images, self.tokenizer, draws))
                met = stream.faults()
                for reason, count in met.items():
                    log.warning("skipping unreadable webdataset data: %d x %s (stream %d)", count, reason, stream_id)
                collated = collate_pairs(samples, met, self.targets)
                collated["cursor"] = {"stream": stream_id, "workers": workers, "batch": batch, **stream.cursor()}
                yield collated
        finally:
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

    def epoch_batches(self, epoch: int, skip_batches: int = 0, cursors: dict[int, dict] | None = None
                      ) -> Iterator[dict]:
        """The batches of `epoch` after the first `skip_batches` ones; webdataset `cursors` (stream -> the `cursor`
        of the last batch done of each stream) let a resume skip reading the epoch's prefix."""
        if self.format == "csv":
            yield from self._csv_loader(epoch, skip_batches)
        elif skip_batches < self.steps_per_epoch:
            yield from self._webdataset_loader(epoch, skip_batches, cursors)

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

    def _webdataset_loader(self, epoch: int, skip_batches: int, cursors: dict[int, dict] | None) -> DataLoader:
        dataset = WebdatasetEpoch(self.urls, self.images, self.tokenizer, self.batch_size, self.cfg.shuffle_buffer,
                                  self.seed, self.rank, epoch, skip_batches, self.steps_per_epoch, self.targets,
                                  cursors)
        return self._loader(dataset, epoch, batch_size=None, collate_fn=_as_is)  # batches come collated
