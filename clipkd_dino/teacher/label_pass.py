"""The labelling pass: the frozen teacher labels every training image with its nearest concept, forms the class
means and, optionally, caches its embeddings of K augmentation views and of every caption.

Work is split into data units (shards, or blocks of CSV images): torchrun rank r labels units r, r + W, ...; its
DataLoader workers each read whole units in order. A unit is written to `OUT/parts/` as soon as it is done (its rows,
float64 sums of the concepts it saw, its cache arrays), so a killed pass resumes where it stopped. Memory per rank is
the concept embeddings [C, D] plus the units in flight (one per loader worker), whatever the number of units.

Rank 0 then merges, with no collective (the other ranks exit when their units are written; rank 0 waits for their
parts on disk, so no process-group timeout can cut a long merge): it streams the parts in unit order into flat
binary arrays, one part at a time, then builds the identity index and refuses an identity seen twice. The result
does not depend on the number of processes (labels exactly, means up to float64 summation order). The merge is
resumable: the parts stay until it has finished; the cache's parts are deleted once the merged cache is written.

Outputs in OUT (see `labels.py` and `cache.py` for the readers):
    samples/, labels/         the identity index and per-sample arrays (label, nearest concept, score, margin)
    class_means.safetensors   image / text means [C, D] and counts; class_means.json: names, provenance, settings
    cache/                    the teacher-embedding cache (`--cache-views K`), see `cache.py`
    summary.json              counts, skipped samples per reason (docs/reliability.md), timings, the pass's digest

A sample that cannot be used (see `clipkd_dino.data.samples`) is skipped and counted per reason; with
`max_bad_fraction` the pass stops (TooManyBadSamples) once more than that fraction of the samples seen were bad.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from tqdm import tqdm

from clipkd_dino.data.faults import BadSample, check_max_bad_fraction, enforce_bad_fraction, load_image
from clipkd_dino.data.identity import SampleIndex, identity_hashes
from clipkd_dino.data.loader import DEFAULT_TIMEOUT, batches, check_shared_memory, data_loader
from clipkd_dino.data.samples import Unit, list_units, read_sample, unit_samples
from clipkd_dino.data.views import ViewSpec
from clipkd_dino.errors import UserError
from clipkd_dino.files import atomic_file, atomic_npy, sha256_file, write_atomic, write_json_atomic
from clipkd_dino.teacher import cache as cache_files
from clipkd_dino.teacher import labels as label_files
from clipkd_dino.teacher.class_means import ClassMeans, ClassSums, SparseSums, dense_classes, renumber, save_class_means
from clipkd_dino.teacher.search import BACKENDS, Nearest, assign_labels, nearest_concepts
from clipkd_dino.shipped import CONCEPTS
from clipkd_dino.engine.guard import StopSignals

DEFAULT_TEMPLATES = CONCEPTS / "prompts.json"
PARTS_DIR = "parts"
WAIT_POLL_SECONDS = 2.0  # rank 0 looks for the other ranks' parts this often
PARTS_TIMEOUT = 3600.0  # a rank's unit may take long, but an hour without a new part means a rank is lost
MERGE_CHUNK = 1 << 20  # rows per chunk when the merge renumbers labels
LOADER_PREFETCH = 2  # batches in flight per loader worker


@dataclass
class LabelSettings:
    """What `clipkd label` takes; every field is recorded in the outputs."""

    teacher: str
    teacher_pretrained: str | None
    concepts: str
    data: str
    out: str
    top_k: int | None = None  # the pool's top K concepts (None: all)
    templates: str | None = None  # JSON list or a prompts file like concepts/prompts.json (None: that file)
    min_score: float | None = None
    min_margin: float | None = None
    min_images: int = 0
    cache_views: int = 0
    cache_dtype: str = "fp16"
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # the training crop the views replay
    hflip: float = 0.0  # probability of a horizontal flip in the views
    seed: int = 0
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    search: str = "torch"
    data_format: str = "auto"
    csv_separator: str = "\t"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    max_bad_fraction: float | None = None  # stop once more than this fraction of the samples seen were bad
    worker_timeout: float = DEFAULT_TIMEOUT  # seconds a batch may take to come from the loader workers (0: none)
    parts_timeout: float = PARTS_TIMEOUT  # seconds rank 0 waits with no new part from the other ranks


def read_templates(path: str | None) -> list[str]:
    """Prompt templates with '{}': a JSON list, or a JSON object with a "templates" list (concepts/prompts.json)."""
    path = Path(path) if path else DEFAULT_TEMPLATES
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"--templates: cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"--templates: {path}:{error.lineno}: invalid JSON ({error.msg})") from None
    templates = raw.get("templates") if isinstance(raw, dict) else raw
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and "{}" in t
                                                                   for t in templates):
        raise UserError(f"--templates: {path}: expected a non-empty list of strings each containing '{{}}'")
    return templates


def check_settings(settings: LabelSettings) -> None:
    """Every check that needs no heavy work; a one-line UserError names the flag or file."""
    from clipkd_dino.data.samples import check_sources
    from clipkd_dino.models.loading import check_clip
    from clipkd_dino.runtime import PRECISIONS

    check_clip(settings.teacher, settings.teacher_pretrained)
    if not Path(settings.concepts).is_file():
        raise UserError(f"--concepts: concept pool not found: {settings.concepts}")
    check_sources(settings.data, settings.data_format, key="--data")
    read_templates(settings.templates)
    check_max_bad_fraction(settings.max_bad_fraction, "--max-bad-fraction")
    checks = [
        (settings.top_k is None or settings.top_k >= 1, "--top-k must be >= 1"),
        (settings.min_images >= 0, "--min-images must be >= 0"),
        (settings.cache_views >= 0, "--cache-views must be >= 0"),
        (settings.batch_size >= 1, "--batch-size must be >= 1"),
        (settings.workers >= 0, "--workers must be >= 0"),
        (settings.worker_timeout >= 0, "--worker-timeout must be >= 0"),
        (settings.parts_timeout > 0, "--parts-timeout must be > 0"),
        (settings.cache_dtype in cache_files.DTYPES, f"--cache-dtype must be one of {sorted(cache_files.DTYPES)}"),
        (settings.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
        (settings.search in BACKENDS, f"--search must be one of {BACKENDS}"),
        (0.0 <= settings.hflip <= 1.0, "--hflip must be between 0 and 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# ---------------------------------------------------------------------------------------------------- reading
class _UnitStream(IterableDataset):
    """The samples of some units: DataLoader worker w reads units w, w + W, ... whole and in order, each sample
    with its eval view [3, H, W], its K replayable views [K, 3, H, W] (when K > 0), captions and ground truth;
    after a unit's last sample, an end marker `{"unit": n, "end": problems}` (the faults met while indexing it). A
    unit that cannot be read at all (e.g. a key repeated within a shard) gives `{"unit": n, "error": message}`."""

    def __init__(self, units: list[tuple[int, Unit]], eval_transform, views: ViewSpec, num_views: int) -> None:
        self.units, self.eval_transform, self.views, self.num_views = units, eval_transform, views, num_views

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for number, unit in self.units[worker::workers]:
            problems: Counter = Counter()
            try:
                refs = unit_samples(unit, problems)
            except UserError as error:
                yield {"unit": number, "error": str(error)}
                return
            for ref in refs:
                yield self._item(number, unit, read_sample(unit.path, ref))
            yield {"unit": number, "end": problems}

    def _item(self, number: int, unit: Unit, raw) -> dict:
        identity = unit.identity(raw.key)
        item = {"unit": number, "identity": identity, "captions": raw.captions, "truth": _truth(raw.metadata),
                "problem": raw.problem}
        if raw.problem:
            return item
        try:
            image = load_image(raw.image)
        except BadSample as bad:
            item["problem"] = bad.reason
            return item
        item["pixels"] = self.eval_transform(image)
        if self.num_views:
            item["views"] = torch.stack([self.views(image, identity, k) for k in range(self.num_views)])
        return item


@dataclass
class _Batch:
    """A loader batch as a few tensors (each tensor a worker hands over is one shared-memory file descriptor):
    `samples`, in stream order, are plain Python (unit, identity, captions, truth, problem; pickled); `pixels`
    [V, 3, H, W] and `views` [V, K, 3, H, W] stack the V readable samples (those without a problem), in order;
    None when V = 0 (views: or K = 0). `markers`: the unit end and error markers of the batch."""

    samples: list[dict]
    markers: list[dict]
    pixels: torch.Tensor | None
    views: torch.Tensor | None

    def pin_memory(self) -> "_Batch":
        """What the DataLoader calls on a custom batch when it pins memory."""
        return _Batch(self.samples, self.markers, *(None if t is None else t.pin_memory()
                                                    for t in (self.pixels, self.views)))


def _collate(items: list[dict]) -> _Batch:
    """`_UnitStream` items -> one `_Batch` (in a worker, `default_collate` stacks straight into shared memory)."""
    samples = [item for item in items if "identity" in item]
    readable = [item for item in samples if "pixels" in item]

    def stacked(key: str) -> torch.Tensor | None:
        return default_collate([item.pop(key) for item in readable]) if readable and key in readable[0] else None

    pixels, views = stacked("pixels"), stacked("views")
    return _Batch(samples, [item for item in items if "identity" not in item], pixels, views)


def _truth(metadata: dict | None) -> str:
    """The kinds of the objects in a sample's metadata (toyworld's ground truth), comma-joined; '' when absent."""
    objects = (metadata or {}).get("objects")
    if not isinstance(objects, list):
        return ""
    return ",".join(str(o["kind"]) for o in objects if isinstance(o, dict) and "kind" in o)


# ---------------------------------------------------------------------------------------------------- one unit
def _part(parts: Path, unit: Unit, suffix: str) -> Path:
    return parts / f"{unit.file_stem}{suffix}"


class _UnitResult:
    """What a unit accumulates until it is written: its rows, sums of the concepts it saw, its cache rows."""

    def __init__(self, unit: Unit, dim: int, device: torch.device) -> None:
        self.unit = unit
        self.identities: list[str] = []
        self.truth: list[str] = []
        self.nearest: list[torch.Tensor] = []  # [concept, score, margin] rows
        self.image_sums, self.text_sums = SparseSums(dim, device), SparseSums(dim, device)
        self.cache_images: list[torch.Tensor] = []
        self.cache_texts: list[torch.Tensor] = []
        self.caption_counts: list[int] = []
        self.skipped: Counter = Counter()

    def save(self, parts: Path, digest: str, cache_dtype: str | None) -> None:
        """Write the unit's part (and its cache part); the JSON goes last, so a unit is done once it exists."""
        from safetensors.torch import save

        rows = torch.cat(self.nearest) if self.nearest else torch.zeros(0, 3, dtype=torch.float64)
        blob = save({"concept": rows[:, 0].int().contiguous(), "score": rows[:, 1].float().contiguous(),
                     "margin": rows[:, 2].float().contiguous(), **self.image_sums.tensors("image"),
                     **self.text_sums.tensors("text")})
        if cache_dtype is not None:
            dim = self.image_sums.sums.shape[1]
            dtype = cache_files.DTYPES[cache_dtype]
            images = torch.cat(self.cache_images) if self.cache_images else torch.zeros(0, 0, dim)
            texts = torch.cat(self.cache_texts) if self.cache_texts else torch.zeros(0, dim)
            cache_blob = save({"images": images.to(dtype).contiguous(), "texts": texts.to(dtype).contiguous(),
                               "caption_counts": torch.tensor(self.caption_counts, dtype=torch.int64)})
            write_atomic(_part(parts, self.unit, ".cache.safetensors"), lambda stream: stream.write(cache_blob))
        write_atomic(_part(parts, self.unit, ".safetensors"), lambda stream: stream.write(blob))
        meta = {"digest": digest, "unit": self.unit.name, "samples": len(self.identities),
                "captions": sum(self.caption_counts), "skipped": dict(self.skipped), "identities": self.identities}
        if any(self.truth):
            meta["truth"] = self.truth
        write_json_atomic(_part(parts, self.unit, ".json"), meta, indent=None)


# ---------------------------------------------------------------------------------------------------- the pass
class LabelPass:
    def __init__(self, settings: LabelSettings) -> None:
        from clipkd_dino.concepts.pool import ConceptPool
        from clipkd_dino.eval.zeroshot import zeroshot_classifier
        from clipkd_dino.models.loading import load_clip, weights_digest
        from clipkd_dino.engine.distributed import check_shared_folder, init_process
        from clipkd_dino.engine.guard import OutputLock

        check_settings(settings)
        self.settings, self.out = settings, Path(settings.out)
        self.parts = self.out / PARTS_DIR
        self.device, self.dist = init_process(settings.device)
        check_shared_folder(self.out, "--out")  # rank 0 merges the parts every rank writes
        self.lock = OutputLock(self.out) if self.dist.is_main else None  # one labelling pass per output folder
        loaded = load_clip(settings.teacher, settings.teacher_pretrained, self.device)
        self.teacher = loaded.model.eval()
        self.teacher.requires_grad_(False)
        self.tokenizer, self.eval_transform = loaded.tokenizer, loaded.transform
        self.views = ViewSpec(size=loaded.image_size, scale=tuple(settings.crop_scale), hflip=settings.hflip,
                              mean=tuple(loaded.mean), std=tuple(loaded.std), seed=settings.seed)
        pool = ConceptPool.load(Path(settings.concepts))
        self.names = pool.names()[: settings.top_k] if settings.top_k else pool.names()
        self.templates = read_templates(settings.templates)
        self.concept_vectors = zeroshot_classifier(self.teacher, self.tokenizer, self.names, self.templates,
                                                   self.device, settings.precision,
                                                   settings.batch_size).T.to(self.device)
        self.dim = self.concept_vectors.shape[1]
        self.units = list_units(settings.data, settings.data_format, settings.csv_separator, settings.csv_img_key,
                                settings.csv_caption_key)
        self.cache_dtype = settings.cache_dtype if settings.cache_views else None
        self.provenance = {
            "teacher": loaded.name,
            "teacher_checkpoint": str(settings.teacher_pretrained) if settings.teacher_pretrained else None,
            "teacher_weights": str(loaded.weights_file) if loaded.weights_file else None,
            "teacher_sha256": weights_digest(self.teacher),  # of the weights themselves, not of their file
            "teacher_logit_scale": loaded.logit_scale,
            "pool": str(settings.concepts),
            "pool_sha256": sha256_file(settings.concepts),
            "templates": self.templates,
            "view_spec": self.views.describe(),
            "settings": asdict(settings),
        }
        # Everything a part depends on: a part written under other settings is redone, not reused.
        unit_inputs = {k: v for k, v in self.provenance["settings"].items()
                       if k not in ("out", "batch_size", "workers", "worker_timeout", "parts_timeout", "device",
                                    "min_images",
                                    "max_bad_fraction")}
        self.digest = hashlib.sha256(json.dumps({**self.provenance, "settings": unit_inputs},
                                                sort_keys=True).encode()).hexdigest()

    def run(self) -> dict:
        """Label this rank's units that are not done; on rank 0, wait for every part and merge. Returns the summary
        on rank 0, {} elsewhere."""
        start = time.time()
        mine = [(n, unit) for n, unit in enumerate(self.units) if n % self.dist.world_size == self.dist.rank]
        todo = [(n, unit) for n, unit in mine if not self._done(unit)]
        if todo:
            self._label(todo, len(mine))
        labelled = time.time() - start
        if not self.dist.is_main:
            return {}
        self._wait_for_parts()
        return self._merge(labelled)

    @torch.no_grad()
    def _label(self, todo: list[tuple[int, Unit]], mine: int) -> None:
        from clipkd_dino.runtime import autocast

        workers = min(self.settings.workers, len(todo))
        # A batch in /dev/shm: float32 eval view and K views of every sample, [3, S, S] each.
        batch_bytes = self.settings.batch_size * (1 + self.settings.cache_views) * 3 * self.views.size ** 2 * 4
        check_shared_memory(batch_bytes, workers, LOADER_PREFETCH, "--batch-size, --workers or --cache-views")
        loader = data_loader(_UnitStream(todo, self.eval_transform, self.views, self.settings.cache_views),
                             workers=workers, prefetch=LOADER_PREFETCH, batch_size=self.settings.batch_size,
                             collate_fn=_collate, timeout=self.settings.worker_timeout)
        units = dict(todo)
        pending: dict[int, _UnitResult] = {}
        skipped: Counter = Counter()  # this run's, for the progress bar and the max_bad_fraction stop
        seen = images = 0
        done = mine - len(todo)  # units of this rank with a part on disk
        progress = tqdm(total=mine, initial=mine - len(todo), unit="shard", desc="labelling",
                        disable=not self.dist.is_main, dynamic_ncols=True)
        # A stop signal is this rank's own (ranks label different numbers of batches, so no collective per batch;
        # torchrun forwards a SIGTERM to every rank).
        with StopSignals() as signals, autocast(self.device, self.settings.precision):
            for batch in batches(loader, "--worker-timeout"):
                for marker in batch.markers:
                    if "error" in marker:
                        raise UserError(marker["error"])
                for item in batch.samples:
                    if item["unit"] not in pending:
                        pending[item["unit"]] = _UnitResult(units[item["unit"]], self.dim, self.device)
                self._label_batch(batch, pending)
                problems = [item["problem"] for item in batch.samples if item["problem"]]
                skipped.update(problems)
                seen += len(batch.samples)
                images += len(batch.samples) - len(problems)
                for end in batch.markers:
                    result = pending.pop(end["unit"], None) or _UnitResult(units[end["unit"]], self.dim, self.device)
                    result.skipped.update(end["end"])
                    skipped.update(end["end"])
                    seen += sum(end["end"].values())
                    result.save(self.parts, self.digest, self.cache_dtype)
                    done += 1
                    progress.update(1)
                enforce_bad_fraction(skipped, seen, self.settings.max_bad_fraction, f"--data {self.settings.data}")
                progress.set_postfix(images=images, skipped=sum(skipped.values()))
                if signals.received is not None and done < mine:
                    progress.close()
                    raise signals.stopped(f"after {done} of {mine} data units", f"they are kept in {self.parts}",
                                          "run the same command again to label the rest")
        progress.close()

    def _done(self, unit: Unit) -> bool:
        """The unit's part exists, was written under these settings, and its cache rows are there or merged."""
        meta = _part(self.parts, unit, ".json")
        if not (meta.is_file() and _part(self.parts, unit, ".safetensors").is_file()):
            return False
        if self.cache_dtype and not (_part(self.parts, unit, ".cache.safetensors").is_file()
                                     or self._cache_merged()):
            return False
        try:
            return json.loads(meta.read_text())["digest"] == self.digest
        except (json.JSONDecodeError, KeyError):
            return False

    def _cache_merged(self) -> bool:
        manifest = self.out / cache_files.CACHE_DIR / cache_files.MANIFEST
        try:
            return json.loads(manifest.read_text()).get("digest") == self.digest
        except (OSError, json.JSONDecodeError):
            return False

    def _label_batch(self, batch: _Batch, pending: dict[int, _UnitResult]) -> None:
        valid = [item for item in batch.samples if not item["problem"]]  # the rows of batch.pixels
        for item in batch.samples:
            if item["problem"]:
                pending[item["unit"]].skipped[item["problem"]] += 1
        if not valid:
            return
        pixels = batch.pixels.to(self.device, non_blocking=True)
        features = self.teacher.encode_image(pixels).float()
        nearest = nearest_concepts(F.normalize(features, dim=-1), self.concept_vectors, self.settings.search)
        labels = assign_labels(nearest, self.settings.min_score, self.settings.min_margin).to(self.device)
        captions = [caption for item in valid for caption in item["captions"]]
        counts = [len(item["captions"]) for item in valid]
        texts = self._encode_texts(captions)
        caption_labels = torch.repeat_interleave(labels, torch.tensor(counts, device=self.device))
        views = None
        if self.settings.cache_views:
            view_pixels = batch.views.flatten(0, 1).to(self.device)  # sample-major, as the [V, K, D] result
            views = self.teacher.encode_image(view_pixels).float().view(len(valid), self.settings.cache_views, -1)
        # float64 rows keep concept ids exact (float32 would not beyond 2**24)
        rows = torch.stack([nearest.concept.double().cpu(), nearest.score.double().cpu(),
                            nearest.margin.double().cpu()], dim=1)
        offsets = [0, *itertools.accumulate(counts)]  # the captions of valid[i]: offsets[i]:offsets[i + 1]
        start = 0
        for unit, group in itertools.groupby(valid, key=lambda item: item["unit"]):  # a batch may span units
            items = list(group)
            stop = start + len(items)
            first, last = offsets[start], offsets[stop]
            result = pending[unit]
            result.identities += [item["identity"] for item in items]
            result.truth += [item["truth"] for item in items]
            result.nearest.append(rows[start:stop])
            result.image_sums.add(features[start:stop], labels[start:stop])
            result.text_sums.add(texts[first:last], caption_labels[first:last])
            if views is not None:
                result.cache_images.append(views[start:stop].cpu())
                result.cache_texts.append(texts[first:last].cpu())
                result.caption_counts += counts[start:stop]
            start = stop

    def _encode_texts(self, captions: list[str]) -> torch.Tensor:
        size = self.settings.batch_size
        chunks = [self.teacher.encode_text(self.tokenizer(captions[i:i + size]).to(self.device)).float()
                  for i in range(0, len(captions), size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim, device=self.device)

    # ------------------------------------------------------------------------------------------------ the merge
    def _wait_for_parts(self) -> None:
        """Rank 0 waits, on the file system, for the units of the other ranks (no collective, so no process-group
        timeout); `parts_timeout` seconds without a new part end the pass with an error naming what is missing."""
        missing = [(n, unit) for n, unit in enumerate(self.units) if not self._done(unit)]
        if not missing:
            return
        last_part = time.monotonic()
        with StopSignals() as signals, tqdm(total=len(self.units), initial=len(self.units) - len(missing),
                                            unit="shard", desc="waiting for the other ranks") as progress:
            while missing:
                if signals.received is not None:
                    raise signals.stopped(f"while waiting for {len(missing)} data units of other ranks",
                                          f"finished units are kept in {self.parts}",
                                          "run the same command again to finish")
                if time.monotonic() - last_part > self.settings.parts_timeout:
                    ranks = sorted({n % self.dist.world_size for n, _ in missing})
                    raise UserError(f"no new part in {self.parts} for {self.settings.parts_timeout:g} s: "
                                    f"{len(missing)} units of ranks {ranks} are missing (e.g. "
                                    f"{_part(self.parts, missing[0][1], '.json').name}); finished units are kept, "
                                    "run the same command again to finish (--parts-timeout sets the wait)")
                time.sleep(WAIT_POLL_SECONDS)
                still = [(n, unit) for n, unit in missing if not self._done(unit)]
                if len(still) < len(missing):
                    progress.update(len(missing) - len(still))
                    last_part = time.monotonic()
                missing = still

    def _metas(self, desc: str) -> Iterator[tuple[Unit, dict]]:
        """(unit, its part's JSON), unit by unit, with a progress bar."""
        for unit in tqdm(self.units, unit="shard", desc=desc, dynamic_ncols=True):
            yield unit, json.loads(_part(self.parts, unit, ".json").read_text())

    def _merge(self, labelled_seconds: float) -> dict:
        start = time.time()
        sizes = [(meta["samples"], meta["captions"], "truth" in meta) for _, meta in self._metas("merge: sizes")]
        num_samples = sum(samples for samples, _, _ in sizes)
        skipped: Counter = Counter()
        image_sums, text_sums = ClassSums(len(self.names), self.dim), ClassSums(len(self.names), self.dim)
        samples_dir, labels_dir = self.out / label_files.SAMPLES_DIR, self.out / label_files.LABELS_DIR
        hashes = np.empty(num_samples, dtype=np.int64)
        sources: dict[str, dict[str, int]] = {}
        with contextlib.ExitStack() as files:
            concept, score, margin = (files.enter_context(atomic_npy(labels_dir / f"{name}.npy", dtype,
                                                                     (num_samples,)))
                                      for name, dtype in (("concept", np.int32), ("score", np.float32),
                                                          ("margin", np.float32)))
            identities = files.enter_context(atomic_file(samples_dir / label_files.IDENTITIES_FILE))
            truth = (files.enter_context(atomic_file(samples_dir / label_files.TRUTH_FILE))
                     if any(with_truth for _, _, with_truth in sizes) else None)
            row = 0
            for unit, meta in self._metas("merge: labels"):
                tensors = _read_part(_part(self.parts, unit, ".safetensors"))
                stop = row + meta["samples"]
                for writer, name in ((concept, "concept"), (score, "score"), (margin, "margin")):
                    writer.write(tensors[name].numpy())
                hashes[row:stop] = identity_hashes(meta["identities"])
                identities.write("".join(f"{i}\n" for i in meta["identities"]).encode("utf-8", "surrogateescape"))
                if truth is not None:
                    truth.write("".join(f"{t}\n" for t in meta.get("truth", [""] * meta["samples"])).encode())
                for sums, prefix in ((image_sums, "image"), (text_sums, "text")):
                    sums.add_sparse(*(tensors[f"{prefix}_{name}"] for name in ("classes", "sums", "counts")))
                skipped.update(meta["skipped"])
                sources.setdefault(unit.source, {})[unit.name] = meta["samples"]
                row = stop
            index, duplicates = SampleIndex.build(hashes)
            if duplicates:
                raise self._duplicate_error(duplicates[0])
        del hashes
        index.save(samples_dir)
        write_json_atomic(samples_dir / label_files.SOURCES_FILE, sources, indent=None)
        seen = num_samples + sum(skipped.values())
        enforce_bad_fraction(skipped, seen, self.settings.max_bad_fraction, f"--data {self.settings.data}", final=True)
        kept = dense_classes(image_sums.counts, self.settings.min_images)
        self._write_labels(labels_dir, kept, num_samples)
        means = ClassMeans(image_sums.means()[kept], image_sums.counts[kept], [self.names[i] for i in kept],
                           text_sums.means()[kept], text_sums.counts[kept])
        labelled = int(means.counts.sum())
        save_class_means(self.out, means, {
            **self.provenance, "digest": self.digest, "concept_index": kept.tolist(),
            "concepts_searched": self.names, "num_concepts_searched": len(self.names),
            "dropped_concepts": {self.names[i]: int(image_sums.counts[i]) for i in range(len(self.names))
                                 if 0 < image_sums.counts[i] < max(self.settings.min_images, 1)},
        })
        if self.cache_dtype and not self._cache_merged():
            self._merge_cache(num_samples, sum(captions for _, captions, _ in sizes))
        summary = {
            "samples": num_samples, "labelled": labelled, "unlabelled": num_samples - labelled,
            "classes": len(kept), "concepts_searched": len(self.names), "skipped": dict(sorted(skipped.items())),
            "seen": seen, "max_bad_fraction": self.settings.max_bad_fraction, "sources": len(sources),
            "units": len(self.units), "processes": self.dist.world_size, "seconds": round(labelled_seconds, 1),
            "merge_seconds": round(time.time() - start, 1),
            "images_per_second": round(num_samples / max(labelled_seconds, 1e-9), 1),
            "cache_views": self.settings.cache_views, "digest": self.digest,
        }
        write_json_atomic(self.out / "summary.json", summary)
        return summary

    def _duplicate_error(self, rows: tuple[int, int]) -> UserError:
        """The one-line refusal of an identity seen twice, naming both units (or, astronomically rarely, a hash
        collision between two identities)."""
        places = []
        start = 0
        for unit, meta in self._metas("merge: locating a repeated identity"):
            places += [(unit.name, meta["identities"][row - start]) for row in rows
                       if start <= row < start + meta["samples"]]
            start += meta["samples"]
        (first_unit, first), (second_unit, second) = places
        if first != second:
            return UserError(f"samples {first!r} ({first_unit}) and {second!r} ({second_unit}) have the same 64-bit "
                             "identity hash: rename one of them")
        return UserError(f"sample key {first!r} appears twice in one data source: in {first_unit} and in "
                         f"{second_unit}; keys must be unique within a source (sources are told apart by folder)")

    def _write_labels(self, labels_dir: Path, kept: torch.Tensor, num_samples: int) -> None:
        """label.npy: the thresholds and the `--min-images` renumbering applied to the nearest concepts, by chunks."""
        arrays = {name: np.load(labels_dir / f"{name}.npy", mmap_mode="r") for name in ("concept", "score", "margin")}
        with atomic_npy(labels_dir / "label.npy", np.int32, (num_samples,)) as label:
            for start in range(0, num_samples, MERGE_CHUNK):
                chunk = {name: torch.from_numpy(np.array(array[start:start + MERGE_CHUNK]))
                         for name, array in arrays.items()}
                nearest = Nearest(chunk["concept"].long(), chunk["score"], chunk["margin"])
                passed = assign_labels(nearest, self.settings.min_score, self.settings.min_margin)
                label.write(renumber(passed, kept, len(self.names)).int().numpy())

    def _merge_cache(self, num_samples: int, num_captions: int) -> None:
        """Stream the units' cache parts into one set of arrays, write the manifest, then drop the parts."""
        cache_dir = self.out / cache_files.CACHE_DIR
        dtype = cache_files.NUMPY_DTYPES[self.cache_dtype]
        views = self.settings.cache_views
        with atomic_npy(cache_dir / "images.npy", dtype, (num_samples, views, self.dim)) as images, \
                atomic_npy(cache_dir / "texts.npy", dtype, (num_captions, self.dim)) as texts, \
                atomic_npy(cache_dir / "caption_offsets.npy", np.int64, (num_samples + 1,)) as offsets:
            offsets.write(np.zeros(1))
            caption = 0
            for unit, meta in self._metas("merge: cache"):
                if not meta["samples"]:
                    continue
                tensors = _read_part(_part(self.parts, unit, ".cache.safetensors"))
                images.write(cache_files.to_numpy(tensors["images"], self.cache_dtype))
                texts.write(cache_files.to_numpy(tensors["texts"], self.cache_dtype))
                offsets.write(caption + np.cumsum(tensors["caption_counts"].numpy()))
                caption += meta["captions"]
        write_json_atomic(cache_dir / cache_files.MANIFEST, {
            "format": "clipkd-teacher-cache", "version": 2, "views": views, "dtype": self.cache_dtype,
            "dim": self.dim, "digest": self.digest, "num_samples": num_samples, "num_captions": num_captions,
            **{k: self.provenance[k] for k in ("teacher", "teacher_checkpoint", "teacher_sha256",
                                                "teacher_logit_scale", "pool_sha256", "view_spec")},
            "seed": self.settings.seed,
        })
        for unit in self.units:
            _part(self.parts, unit, ".cache.safetensors").unlink(missing_ok=True)


def _read_part(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"cannot read {path}: {error}; delete it and run the same command again") from None


def label_dataset(settings: LabelSettings) -> dict:
    """Run the labelling pass (single process or one rank under torchrun); returns the summary on rank 0."""
    from clipkd_dino.engine.distributed import shutdown_distributed

    labelling = None
    try:
        labelling = LabelPass(settings)
        return labelling.run()
    finally:
        if labelling is not None and labelling.lock:
            labelling.lock.release()
        shutdown_distributed()
