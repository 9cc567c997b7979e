"""Image-caption training data from open_clip-style CSV files or webdataset shards.

Bad samples (unreadable images, empty captions, broken shards) never stop training: they are dropped from the
batch and counted per reason; the counts travel with each batch (`batch["skipped"]`) so the trainer can report
them, even from DataLoader worker processes.

- CSV: every row is visited once per epoch (DistributedSampler); a resumed run skips the batches already done.
- webdataset: an epoch is exact (`data.epochs: exact`: the shards' samples in an order drawn per epoch, each of the
  processes x W streams reading a contiguous share, each sample once) or resampled (shards drawn with replacement,
  open_clip's "resampled" mode, `num_samples // global batch` steps an epoch); see `TrainData`. A `.txt` member with
  several lines holds several captions: one is drawn at random at each visit. An epoch of a process is W streams,
  one per DataLoader worker (W = `data.workers`, 1 without workers): each reads its own pieces of shards, each
  once, in order, through its own shuffle buffer (`ShardStream`), so the bytes read per epoch are the data's size
  whatever W. Everything is a pure function of (seed, rank, epoch, stream) and positions: the pieces, the buffer's
  picks, and each sample's caption, view and random augmentation. Batch b is batch b // W of stream b % W (a
  skipped sample keeps its place, so a batch may hold fewer valid samples). Each batch carries its stream's cursor
  (a few ints and the shuffle buffer's pointers); a resumed epoch restores every stream from the cursors of the last
  batches done, reading only the buffered samples and the current shard's index, and yields exactly the batches
  the uninterrupted epoch yields after them. The trainer resumes only onto the same stream (`TrainData.fingerprint`
  in `latest.pt`). Skipped batches are never decoded, and their bad samples and broken shard members are not
  counted again.

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
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, get_worker_info

from clipkd_dino.data.csv_table import CsvTable
from clipkd_dino.data.faults import BadSample, load_image
from clipkd_dino.data.identity import Shard, csv_source, identity_hashes, sample_identity, shard_sources
from clipkd_dino.data.loader import batches as loader_batches
from clipkd_dino.data.loader import data_loader
from clipkd_dino.data.samples import RawSample, SampleRef, data_format, expand_shards, index_shard, read_sample
from clipkd_dino.data.tars import open_shard
from clipkd_dino.data.views import ViewSpec
from clipkd_dino.errors import ConfigError, UserError

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


Pointer = tuple[int, int]  # (piece, sample index within that piece's shard): where a raw sample of a stream was read
Piece = tuple[Shard, int, "int | None"]  # a shard and the range [start, stop) of its samples a stream reads (None: all)
Pieces = Callable[[int], "Piece | None"]  # piece d of a stream; None past the stream's end


class ShardStream:
    """One stream of raw webdataset samples: pieces of shards read in order through their index
    (`samples.index_shard`, the tar reader of every command), each member with one read of its exact size, through
    a shuffle buffer.

    `pieces(d)` says what piece d is: in an exact epoch a planned range of a shard (`exact_pieces`), the stream
    ending after the last; resampled, a whole shard drawn with replacement (`resampled_pieces`, endless). The sample
    given out at position p is the buffer's entry `hash(key, p) % len(buffer)`, where `key` is (seed, rank, epoch,
    stream). So the whole state after any position is small (a `cursor`: the position, the next piece and sample,
    the buffer's pointers), and `restore` rebuilds it by reading only the buffered samples and the current shard's
    index, not the stream's prefix; `advance(n)` moves past n positions reading shard indexes only (no sample).
    Faults (broken, empty, truncated shards) are counted when a shard is first indexed in the stream, never on a
    restore; `faults()` hands over those met since its last call.
    """

    def __init__(self, pieces: Pieces, bufsize: int, key: tuple, cursor: dict | None = None,
                 shards: int = 1) -> None:
        self.pieces, self.bufsize, self.key = pieces, max(1, bufsize), key
        self.initial = min(self.bufsize, SHUFFLE_INITIAL)
        self.max_empty_draws = max(1000, 20 * shards)
        self.position, self.draw, self.next, self.stop, self.empty_draws = 0, -1, 0, 0, 0
        self.refs: tuple[SampleRef, ...] = ()
        self.buffer: list[tuple[Pointer, RawSample | None, str | None]] = []
        self._faults: Counter = Counter()
        self._open: tuple[str, BinaryIO] | None = None
        self._reading = True
        if cursor is not None:
            self._restore(cursor)

    def take(self) -> tuple[RawSample, str] | None:
        """The next raw sample given out and its identity; None once the stream is over."""
        for _ in range(2):  # while filling, read two samples for each one given out
            if len(self.buffer) < self.bufsize and (entry := self._read_next()) is not None:
                self.buffer.append(entry)
        while len(self.buffer) < self.initial and (entry := self._read_next()) is not None:
            self.buffer.append(entry)
        if not self.buffer:
            return None
        index = _hashed(*self.key, "pick", self.position) % len(self.buffer)
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        self.position += 1
        _, raw, identity = self.buffer.pop()
        return raw, identity

    def advance(self, count: int) -> None:
        """Move past `count` positions reading shard indexes only, then read the samples left in the buffer."""
        self._reading = False
        try:
            for _ in range(count):
                if self.take() is None:
                    break
        finally:
            self._reading = True
        self._restore(self.cursor())

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

    def _read_next(self) -> tuple[Pointer, RawSample | None, str | None] | None:
        while self.next >= self.stop:
            piece = self.pieces(self.draw + 1)
            if piece is None:
                return None
            self.draw += 1
            self.empty_draws += 1
            if self.empty_draws > self.max_empty_draws:
                raise UserError(f"webdataset: no readable sample in {self.max_empty_draws} shards drawn in a row "
                                f"({piece[0].url}, ...): are they all broken?")
            self.refs = index_shard(piece[0].url, self._faults)
            self.next, self.stop = _piece_range(piece, self.refs)
        pointer = (self.draw, self.next)
        self.next += 1
        self.empty_draws = 0
        if not self._reading:
            return pointer, None, None
        return pointer, *self._read(pointer, self.refs)

    def _read(self, pointer: Pointer, refs: tuple[SampleRef, ...]) -> tuple[RawSample, str]:
        shard = self.pieces(pointer[0])[0]
        if self._open is None or self._open[0] != shard.url:
            self.close()
            self._open = (shard.url, open_shard(shard.url))  # each member: one read of its size
        ref = refs[pointer[1]]
        return read_sample(shard.url, ref, self._open[1]), sample_identity(shard.source, ref.key)

    def _restore(self, cursor: dict) -> None:
        self.position, self.draw = cursor["position"], cursor["draw"]
        self.next, self.empty_draws = cursor["next"], cursor["empty_draws"]
        indexes: dict[int, tuple[SampleRef, ...]] = {}

        def refs(draw: int) -> tuple[SampleRef, ...]:  # faults of these shards were counted on their first read
            if draw not in indexes:
                indexes[draw] = index_shard(self.pieces(draw)[0].url, Counter())
            return indexes[draw]

        pointers = [tuple(row) for row in cursor["buffer"].tolist()]
        self.buffer = [(pointer, *self._read(pointer, refs(pointer[0]))) for pointer in pointers]
        self.refs = refs(self.draw) if self.draw >= 0 else ()
        self.stop = _piece_range(self.pieces(self.draw), self.refs)[1] if self.draw >= 0 else 0


def _piece_range(piece: Piece, refs: tuple[SampleRef, ...]) -> tuple[int, int]:
    """The sample range [start, stop) of a piece within its shard's readable samples (a truncated shard is shorter
    than its listed size: the samples past the break are missing from the epoch, counted as `truncated_shard`)."""
    _, start, stop = piece
    return min(start, len(refs)), min(len(refs) if stop is None else stop, len(refs))


def resampled_pieces(shards: list[Shard], key: tuple) -> Pieces:
    """Whole shards drawn with replacement: piece d is `shards[hash(key, d) % n]` (endless)."""
    return lambda draw: (shards[_hashed(*key, "shard", draw) % len(shards)], 0, None)


def exact_pieces(shards: list[Shard], sizes: np.ndarray, seed: int, epoch: int, streams: int,
                 stream: int) -> list[Piece]:
    """The pieces of global stream `stream` of `streams` in an exact epoch: the shards in an order drawn from
    (seed, epoch), their samples laid end to end (N = sum of `sizes`), and stream s given the contiguous range
    [s N // S, (s + 1) N // S): each sample once per epoch, every stream within one sample of the others."""
    order = np.random.default_rng(_hashed(seed, epoch, "shard order")).permutation(len(shards))
    ends = np.cumsum(sizes[order])
    total = int(ends[-1]) if len(ends) else 0
    low, high = stream * total // streams, (stream + 1) * total // streams
    pieces = []
    for index in range(int(np.searchsorted(ends, low, side="right")), len(order)):
        begin = int(ends[index] - sizes[order[index]])
        if begin >= high:
            break
        pieces.append((shards[order[index]], max(low - begin, 0), min(high, int(ends[index])) - begin))
    return pieces


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

    The epoch is W streams per process (W = the number of loader workers, 1 without): global batch b is batch
    b // W of stream b % W, the samples at positions [(b // W) B, (b // W + 1) B) of that `ShardStream`. Each
    stream is read by one worker, so every shard visit is read once, by one process. With `sizes` (the shards'
    sample counts) the epoch is exact: stream w of process r is global stream r W + w of `exact_pieces`; without,
    shards are drawn with replacement (`resampled_pieces`). A stream that runs out (a truncated shard) gives
    shorter batches, so every process yields the same number of batches. The DataLoader takes batches from its
    workers in turn starting at worker 0, so worker i serves stream (i + skip) % W. Each batch carries its stream's
    `cursor`; with `cursors` (stream -> the cursor after the last batch done), a resumed epoch restores every stream
    instead of moving through its prefix. Without a cursor for a stream, the stream is moved past its prefix by
    reading shard indexes only (`ShardStream.advance`). A sample's draws (caption, view, random augmentation) come
    from (seed, rank, epoch, stream, its position). Faults met while a batch's samples are read are counted in it.
    """

    def __init__(self, shards: list[Shard], images: PairImages, tokenizer, batch_size: int, shuffle_buffer: int,
                 seed: int, rank: int, epoch: int, skip: int, stop: int, targets: BatchTargets | None = None,
                 cursors: dict[int, dict] | None = None, sizes: np.ndarray | None = None,
                 world_size: int = 1) -> None:
        self.shards, self.images, self.tokenizer, self.batch_size = shards, images, tokenizer, batch_size
        self.shuffle_buffer, self.seed, self.rank, self.epoch = shuffle_buffer, seed, rank, epoch
        self.skip, self.stop, self.targets, self.cursors = skip, stop, targets, cursors or {}
        self.sizes, self.world_size = sizes, world_size

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
            cursor = None  # saved with another number of workers, or not the batch before: move instead
        stream = ShardStream(self._pieces(key, workers, stream_id), self.shuffle_buffer, key, cursor,
                             len(self.shards))
        try:
            if cursor is None:
                stream.advance(owned[0] // workers * self.batch_size)
                stream.faults()
            for batch in owned:
                samples = []
                for _ in range(self.batch_size):
                    if (taken := stream.take()) is None:
                        break
                    draws = _draws(*key, stream.position - 1)
                    samples.append(_decode_raw(*taken, self.images, self.tokenizer, draws))
                met = stream.faults()
                for reason, count in met.items():
                    log.warning("skipping unreadable webdataset data: %d x %s (stream %d)", count, reason, stream_id)
                collated = collate_pairs(samples, met, self.targets)
                collated["cursor"] = {"stream": stream_id, "workers": workers, "batch": batch, **stream.cursor()}
                yield collated
        finally:
            stream.close()

    def _pieces(self, key: tuple, workers: int, stream_id: int) -> Pieces:
        if self.sizes is None:
            return resampled_pieces(self.shards, key)
        plan = exact_pieces(self.shards, self.sizes, self.seed, self.epoch, workers * self.world_size,
                            self.rank * workers + stream_id)
        return lambda draw: plan[draw] if draw < len(plan) else None


def _as_is(batch: dict) -> dict:
    return batch


EPOCH_MODES = ("auto", "exact", "resampled")


def listed_sizes(urls: list[str]) -> tuple[np.ndarray | None, str]:
    """The sample count of each shard from the `sizes.json` files beside them (int64 [n]), or None and the first
    shard that is not listed, as a sentence."""
    sizes, files = [], {}
    for url in urls:
        sizes_file = Path(url).parent / "sizes.json"
        if sizes_file not in files:
            files[sizes_file] = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
        if Path(url).name not in files[sizes_file]:
            return None, f"{url} is not listed in {sizes_file}"
        sizes.append(int(files[sizes_file][Path(url).name]))
    return np.asarray(sizes, dtype=np.int64), ""


class TrainData:
    """The training stream of one process: a DataLoader plus how many batches make an epoch.

    Webdataset epochs are exact (`data.epochs: exact`: every sample once per epoch, split across processes and
    workers) or resampled (shards drawn with replacement, `data.num_samples` samples an epoch). `auto` picks exact
    when every shard is listed in a `sizes.json` beside it and `data.num_samples` is unset or their sum.
    """

    def __init__(self, cfg, images: PairImages | Callable, tokenizer, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, targets: BatchTargets | None = None) -> None:
        images = images if isinstance(images, PairImages) else PairImages(images)
        self.cfg, self.images, self.tokenizer, self.targets = cfg, images, tokenizer, targets
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.format = data_format(cfg.train, cfg.format)
        self.streams = max(cfg.workers, 1)  # per process
        self.sizes: np.ndarray | None = None
        if self.format == "csv":
            self.dataset = CsvPairs(cfg.train, images, tokenizer, cfg.csv_img_key, cfg.csv_caption_key,
                                    cfg.csv_separator, seed)
            self.num_samples, self.epochs = len(self.dataset), "exact"
            self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        else:
            urls = expand_shards(cfg.train)
            shards = shard_sources(urls)
            sizes, unlisted = listed_sizes(urls)
            order = sorted(range(len(shards)), key=lambda i: shards[i].name)  # `::` order does not matter
            self.shards = [shards[i] for i in order]
            self.listed = sizes[order] if sizes is not None else None
            self.epochs = self._epoch_mode(sizes, unlisted)
            if self.epochs == "exact":
                self.sizes = self.listed
                self.num_samples = int(self.sizes.sum())
                per_stream = self.num_samples // (self.streams * world_size)
                self.steps_per_epoch = self.streams * (per_stream // batch_size)
            else:
                self.num_samples = cfg.num_samples or int(sizes.sum())
                self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.train has {self.num_samples} samples, fewer than one batch for each of "
                f"{world_size} processes x {self.streams} loader streams ({batch_size} a batch): lower "
                "train.batch_size or data.workers"
            )

    def _epoch_mode(self, sizes: np.ndarray | None, unlisted: str) -> str:
        mode, configured = self.cfg.epochs, self.cfg.num_samples
        if mode not in EPOCH_MODES:
            raise ConfigError(f"config key 'data.epochs' must be one of {', '.join(EPOCH_MODES)}; got {mode!r}")
        if mode == "exact" and sizes is None:
            raise ConfigError(f"config key 'data.epochs': exact epochs need every shard's size: {unlisted}")
        if mode == "exact" and configured not in (None, int(sizes.sum())):
            raise ConfigError(f"config key 'data.num_samples' ({configured}) sets a resampled epoch's length; "
                              f"an exact epoch is the shards' {int(sizes.sum())} samples: unset it, or set "
                              "data.epochs=resampled")
        if sizes is None and not configured:
            raise ConfigError(f"config key 'data.num_samples' is needed: {unlisted}")
        if mode == "auto":
            mode = "exact" if sizes is not None and configured in (None, int(sizes.sum())) else "resampled"
        if mode == "resampled" and self.rank == 0:
            log.warning("data.epochs: resampled: shards are drawn with replacement, so an epoch of as many draws "
                        "as shards reads about 63% of them (data.epochs=exact reads each sample once; it needs "
                        "every shard in a sizes.json and data.num_samples unset)")
        return mode

    def fingerprint(self) -> dict[str, Any]:
        """What defines this process's stream of batches, by the config key that sets it: a resume onto a stream
        whose fingerprint differs would read other samples than the saved positions point at."""
        if self.format == "csv":
            source = f"{Path(self.cfg.train).name} {Path(self.cfg.train).stat().st_size} bytes {self.num_samples} rows"
        else:
            sizes = self.listed.tolist() if self.listed is not None else [-1] * len(self.shards)
            names = "\n".join(f"{shard.name}:{size}" for shard, size in zip(self.shards, sizes))
            source = f"{len(self.shards)} shards sha256:{hashlib.sha256(names.encode()).hexdigest()[:16]}"
        fingerprint = {"data.train": source, "data.epochs": self.epochs, "num_samples": self.num_samples,
                       "train.batch_size": self.batch_size, "processes": self.world_size, "train.seed": self.seed}
        if self.format != "csv":
            fingerprint |= {"data.workers": self.streams, "data.shuffle_buffer": self.cfg.shuffle_buffer}
        return fingerprint

    def batch_bytes(self) -> int:
        """About the bytes of one collated batch (its pixels and tokens, from one probe sample, plus 10%)."""
        view = 0 if self.images.views is not None else -1
        with torch.random.fork_rng(devices=[]):  # a random crop's draws leave training's generator alone
            pixels = self.images(Image.new("RGB", (256, 256)), "size probe", view)
        tokens = self.tokenizer(["size probe"])[0]
        per_sample = pixels.numel() * pixels.element_size() + tokens.numel() * tokens.element_size() + 64
        return int(1.1 * per_sample * self.batch_size)

    def epoch_batches(self, epoch: int, skip_batches: int = 0, cursors: dict[int, dict] | None = None
                      ) -> Iterator[dict]:
        """The batches of `epoch` after the first `skip_batches` ones; webdataset `cursors` (stream -> the `cursor`
        of the last batch done of each stream) let a resume skip reading the epoch's prefix."""
        if skip_batches >= self.steps_per_epoch:
            return
        if self.format == "csv":
            loader = self._csv_loader(epoch, skip_batches)
        else:
            loader = self._webdataset_loader(epoch, skip_batches, cursors)
        yield from loader_batches(loader, "data.worker_timeout")

    def _loader(self, dataset, epoch: int, **kwargs) -> DataLoader:
        """Its own generator (worker seeds) leaves the global RNG, and so dropout, the same after a resume."""
        options = {"batch_size": self.batch_size,
                   "collate_fn": functools.partial(collate_pairs, targets=self.targets)} | kwargs
        return data_loader(dataset, workers=self.cfg.workers, prefetch=self.cfg.prefetch,
                           seed=self.seed * 100_003 + epoch, timeout=self.cfg.worker_timeout, **options)

    def _csv_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        self.dataset.epoch = epoch
        return self._loader(self.dataset, epoch, sampler=SkipFirst(sampler, skip_batches * self.batch_size),
                            drop_last=True)

    def _webdataset_loader(self, epoch: int, skip_batches: int, cursors: dict[int, dict] | None) -> DataLoader:
        dataset = WebdatasetEpoch(self.shards, self.images, self.tokenizer, self.batch_size, self.cfg.shuffle_buffer,
                                  self.seed, self.rank, epoch, skip_batches, self.steps_per_epoch, self.targets,
                                  cursors, self.sizes, self.world_size)
        return self._loader(dataset, epoch, batch_size=None, collate_fn=_as_is)  # batches come collated
