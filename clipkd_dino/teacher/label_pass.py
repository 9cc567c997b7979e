"""The labelling pass: the frozen teacher labels every training image with its nearest concept, forms the class
means and, optionally, caches its embeddings of K augmentation views and of every caption.

Work is split into data units (shards, or blocks of CSV images): each is written to `OUT/parts/` as soon as it is
done (labels, per-concept float64 sums, cache arrays), so a killed pass resumes where it stopped and torchrun ranks
label disjoint units. The merge then sums the parts in unit order: the result does not depend on the number of
processes (labels exactly, means up to float64 summation order).

Outputs in OUT (see `labels.py` for the reader):
    labels.tsv                key, label (dense class, -1 = none), concept (nearest, even below the thresholds),
                              score, margin, and truth (the objects' kinds, when the data's metadata has them)
    class_means.safetensors   image / text means [C, D] and counts; class_means.json: names and every setting
    cache/                    the teacher-embedding cache (`--cache-views K`), see `cache.py`
    summary.json              counts, skipped samples per reason (docs/reliability.md), timings

A sample that cannot be used (see `clipkd_dino.data.samples`) is skipped and counted per reason; with
`max_bad_fraction` the pass stops (TooManyBadSamples) once more than that fraction of the samples seen were bad.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipkd_dino.data.faults import BadSample, check_max_bad_fraction, enforce_bad_fraction, load_image
from clipkd_dino.data.samples import SampleRef, Unit, list_units, read_sample, unit_samples
from clipkd_dino.data.views import ViewSpec, view_spec
from clipkd_dino.errors import UserError
from clipkd_dino.files import write_atomic, write_json_atomic
from clipkd_dino.teacher import cache as cache_files
from clipkd_dino.teacher.class_means import ClassMeans, ClassSums, dense_classes, renumber, save_class_means
from clipkd_dino.teacher.labels import LABELS_FILE
from clipkd_dino.teacher.search import BACKENDS, Nearest, assign_labels, nearest_concepts
from clipkd_dino.runtime import init_data_worker
from clipkd_dino.train.guard import StopSignals

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATES = REPO / "concepts" / "prompts.json"
PARTS_DIR = "parts"


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
    from clipkd_dino.data.pairs import check_sources
    from clipkd_dino.models.factory import check_pretrained, model_config
    from clipkd_dino.runtime import PRECISIONS

    model_config(settings.teacher)
    check_pretrained(settings.teacher_pretrained)
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
        (settings.cache_dtype in cache_files.DTYPES, f"--cache-dtype must be one of {sorted(cache_files.DTYPES)}"),
        (settings.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
        (settings.search in BACKENDS, f"--search must be one of {BACKENDS}"),
        (0.0 <= settings.hflip <= 1.0, "--hflip must be between 0 and 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- reading
class _UnitSamples(Dataset):
    """The samples of some units, in order: the eval view, K replayable views, the captions, the ground truth."""

    def __init__(self, units: list[tuple[int, Unit, tuple[SampleRef, ...]]], eval_transform, views: ViewSpec,
                 num_views: int) -> None:
        self.items = [(number, unit.path, ref) for number, unit, refs in units for ref in refs]
        self.eval_transform, self.views, self.num_views = eval_transform, views, num_views

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        number, path, ref = self.items[index]
        raw = read_sample(path, ref)
        item = {"unit": number, "key": raw.key, "captions": raw.captions, "truth": _truth(raw.metadata),
                "problem": raw.problem}
        if raw.problem:
            return item
        try:
            image = load_image(raw.image)
        except BadSample as bad:
            item["problem"] = bad.reason
            return item
        item["pixels"] = self.eval_transform(image)
        item["views"] = [self.views(image, raw.key, k) for k in range(self.num_views)]
        return item


def _truth(metadata: dict | None) -> str:
    """The kinds of the objects in a sample's metadata (toyworld's ground truth), comma-joined; '' when absent."""
    objects = (metadata or {}).get("objects")
    if not isinstance(objects, list):
        return ""
    return ",".join(str(o["kind"]) for o in objects if isinstance(o, dict) and "kind" in o)


# ---------------------------------------------------------------------------------------------------- one unit
class _UnitResult:
    """What a unit accumulates until it is written: labels per sample, per-concept sums, cache rows."""

    def __init__(self, name: str, num_concepts: int, dim: int, device: torch.device) -> None:
        self.name = name
        self.keys: list[str] = []
        self.truth: list[str] = []
        self.nearest: list[torch.Tensor] = []  # [concept, score, margin] rows
        self.image_sums = ClassSums(num_concepts, dim, device)
        self.text_sums = ClassSums(num_concepts, dim, device)
        self.cache_images: list[torch.Tensor] = []
        self.cache_texts: list[torch.Tensor] = []
        self.caption_counts: list[int] = []
        self.skipped: Counter = Counter()

    def save(self, parts: Path, digest: str, cache_dir: Path | None, cache_dtype: str) -> None:
        from safetensors.torch import save

        rows = torch.cat(self.nearest) if self.nearest else torch.zeros(0, 3)
        blob = save({"concept": rows[:, 0].long().contiguous(), "score": rows[:, 1].float().contiguous(),
                     "margin": rows[:, 2].float().contiguous(),
                     "image_sums": self.image_sums.sums.cpu(), "image_counts": self.image_sums.counts.cpu(),
                     "text_sums": self.text_sums.sums.cpu(), "text_counts": self.text_sums.counts.cpu()})
        if cache_dir is not None:
            dim = self.image_sums.sums.shape[1]
            images = torch.cat(self.cache_images) if self.cache_images else torch.zeros(0, 0, dim)
            texts = torch.cat(self.cache_texts) if self.cache_texts else torch.zeros(0, dim)
            offsets = [0]
            for count in self.caption_counts:
                offsets.append(offsets[-1] + count)
            cache_files.write_unit(cache_dir, self.name, self.keys, cache_files.to_numpy(images, cache_dtype),
                                   cache_files.to_numpy(texts, cache_dtype), offsets)
        write_atomic(parts / f"{self.name}.safetensors", lambda stream: stream.write(blob))
        write_json_atomic(parts / f"{self.name}.json", {"digest": digest, "keys": self.keys, "truth": self.truth,
                                                          "skipped": dict(self.skipped)}, indent=None)


# ---------------------------------------------------------------------------------------------------- the pass
class LabelPass:
    def __init__(self, settings: LabelSettings) -> None:
        from clipkd_dino.concepts.pool import ConceptPool
        from clipkd_dino.eval.zeroshot import zeroshot_classifier
        from clipkd_dino.models import create_model, get_tokenizer, image_transforms
        from clipkd_dino.train.distributed import init_process
        from clipkd_dino.train.guard import OutputLock

        check_settings(settings)
        self.settings, self.out = settings, Path(settings.out)
        self.device, self.dist = init_process(settings.device)
        self.lock = OutputLock(self.out) if self.dist.is_main else None  # one labelling pass per output folder
        self.teacher = create_model(settings.teacher, settings.teacher_pretrained, self.device).eval()
        self.teacher.requires_grad_(False)
        self.tokenizer = get_tokenizer(settings.teacher)
        self.eval_transform = image_transforms(self.teacher, augment=False)[1]
        self.views = view_spec(self.teacher, tuple(settings.crop_scale), settings.hflip, settings.seed)
        pool = ConceptPool.load(Path(settings.concepts))
        self.names = pool.names()[: settings.top_k] if settings.top_k else pool.names()
        self.templates = read_templates(settings.templates)
        self.concept_vectors = zeroshot_classifier(self.teacher, self.tokenizer, self.names, self.templates,
                                                   self.device, settings.precision,
                                                   settings.batch_size).T.to(self.device)
        self.dim = self.concept_vectors.shape[1]
        self.units = list_units(settings.data, settings.data_format, settings.csv_separator, settings.csv_img_key,
                                settings.csv_caption_key)
        self.provenance = {
            "teacher": settings.teacher,
            "teacher_checkpoint": str(settings.teacher_pretrained) if settings.teacher_pretrained else None,
            "teacher_sha256": sha256_file(settings.teacher_pretrained) if settings.teacher_pretrained else None,
            "teacher_logit_scale": float(self.teacher.logit_scale.exp()),
            "pool": str(settings.concepts),
            "pool_sha256": sha256_file(settings.concepts),
            "templates": self.templates,
            "view_spec": self.views.describe(),
            "settings": asdict(settings),
        }
        # Everything a part depends on: a part written under other settings is redone, not reused.
        unit_inputs = {k: v for k, v in self.provenance["settings"].items()
                       if k not in ("out", "batch_size", "workers", "device", "min_images", "max_bad_fraction")}
        self.digest = hashlib.sha256(json.dumps({**self.provenance, "settings": unit_inputs},
                                                sort_keys=True).encode()).hexdigest()

    @torch.no_grad()
    def run(self) -> dict:
        from clipkd_dino.runtime import autocast

        start = time.time()
        parts = self.out / PARTS_DIR
        cache_dir = self.out / cache_files.CACHE_DIR if self.settings.cache_views else None
        mine = [(n, unit) for n, unit in enumerate(self.units) if n % self.dist.world_size == self.dist.rank]
        todo = [(n, unit) for n, unit in mine if not self._done(parts, unit)]
        indexing: dict[int, Counter] = {n: Counter() for n, _ in todo}
        indexed = [(n, unit, unit_samples(unit, indexing[n])) for n, unit in todo]
        dataset = _UnitSamples(indexed, self.eval_transform, self.views, self.settings.cache_views)
        loader = DataLoader(dataset, batch_size=self.settings.batch_size, num_workers=self.settings.workers,
                            collate_fn=list, pin_memory=self.device.type == "cuda", worker_init_fn=init_data_worker)
        pending = {n: _UnitResult(unit.name, len(self.names), self.dim, self.device) for n, unit, _ in indexed}
        remaining = {n: len(refs) for n, _, refs in indexed}  # samples not yet labelled, per unit
        skipped: Counter = Counter()  # this run's, for the progress bar and the max_bad_fraction stop
        for n, counts in indexing.items():
            pending[n].skipped.update(counts)
            skipped.update(counts)
        seen = sum(skipped.values())

        def save_finished() -> None:
            for n in [n for n in pending if remaining[n] == 0]:
                pending.pop(n).save(parts, self.digest, cache_dir, self.settings.cache_dtype)

        save_finished()
        progress = tqdm(total=len(dataset), unit="img", desc="labelling", disable=not self.dist.is_main,
                        dynamic_ncols=True)
        # A stop signal is this rank's own (ranks label different numbers of batches, so no collective per batch;
        # torchrun forwards a SIGTERM to every rank).
        with StopSignals() as signals, autocast(self.device, self.settings.precision):
            for batch in loader:
                self._label_batch(batch, pending)
                skipped.update(item["problem"] for item in batch if item["problem"])
                seen += len(batch)
                enforce_bad_fraction(skipped, seen, self.settings.max_bad_fraction, f"--data {self.settings.data}")
                progress.update(len(batch))
                progress.set_postfix(skipped=sum(skipped.values()))
                remaining.update((n, remaining[n] - count) for n, count in Counter(i["unit"] for i in batch).items())
                save_finished()
                if signals.received is not None and pending:
                    progress.close()
                    raise signals.stopped(f"after {len(mine) - len(pending)} of {len(mine)} data units",
                                          f"they are kept in {parts}", "run the same command again to label the rest")
        progress.close()
        labelled = time.time() - start
        self._barrier()
        summary = self._merge(parts, cache_dir, labelled) if self.dist.is_main else {}
        self._barrier()
        return summary

    def _done(self, parts: Path, unit: Unit) -> bool:
        meta = parts / f"{unit.name}.json"
        if not (meta.is_file() and (parts / f"{unit.name}.safetensors").is_file()):
            return False
        try:
            return json.loads(meta.read_text())["digest"] == self.digest
        except (json.JSONDecodeError, KeyError):
            return False

    def _label_batch(self, batch: list[dict], pending: dict[int, _UnitResult]) -> None:
        valid = [item for item in batch if "pixels" in item]
        for item in batch:
            if item["problem"]:
                pending[item["unit"]].skipped[item["problem"]] += 1
        if not valid:
            return
        pixels = torch.stack([item["pixels"] for item in valid]).to(self.device, non_blocking=True)
        features = self.teacher.encode_image(pixels).float()
        nearest = nearest_concepts(F.normalize(features, dim=-1), self.concept_vectors, self.settings.search)
        labels = assign_labels(nearest, self.settings.min_score, self.settings.min_margin).to(self.device)
        captions = [caption for item in valid for caption in item["captions"]]
        counts = [len(item["captions"]) for item in valid]
        texts = self._encode_texts(captions)
        caption_labels = torch.repeat_interleave(labels, torch.tensor(counts, device=self.device))
        views = None
        if self.settings.cache_views:
            view_pixels = torch.stack([v for item in valid for v in item["views"]]).to(self.device)
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
            result.keys += [item["key"] for item in items]
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

    def _barrier(self) -> None:
        if self.dist.enabled:
            torch.distributed.barrier()

    def _merge(self, parts: Path, cache_dir: Path | None, labelled_seconds: float) -> dict:
        from safetensors.torch import load_file

        image_sums, text_sums = ClassSums(len(self.names), self.dim), ClassSums(len(self.names), self.dim)
        skipped: Counter = Counter()
        loaded = []
        for unit in self.units:
            tensors = load_file(str(parts / f"{unit.name}.safetensors"))
            meta = json.loads((parts / f"{unit.name}.json").read_text())
            for sums, prefix in ((image_sums, "image"), (text_sums, "text")):
                sums.sums += tensors[f"{prefix}_sums"]
                sums.counts += tensors[f"{prefix}_counts"]
            skipped.update(meta["skipped"])
            loaded.append((unit.name, tensors, meta))
        num_samples = sum(len(meta["keys"]) for _, _, meta in loaded)
        seen = num_samples + sum(skipped.values())
        enforce_bad_fraction(skipped, seen, self.settings.max_bad_fraction, f"--data {self.settings.data}", final=True)
        kept = dense_classes(image_sums.counts, self.settings.min_images)
        self._write_labels(loaded, kept)
        means = ClassMeans(image_sums.means()[kept], image_sums.counts[kept], [self.names[i] for i in kept],
                           text_sums.means()[kept], text_sums.counts[kept])
        labelled = int(means.counts.sum())
        save_class_means(self.out, means, {
            **self.provenance, "concept_index": kept.tolist(), "num_concepts_searched": len(self.names),
            "dropped_concepts": {self.names[i]: int(image_sums.counts[i]) for i in range(len(self.names))
                                 if 0 < image_sums.counts[i] < max(self.settings.min_images, 1)},
        })
        if cache_dir is not None:
            cache_files.write_manifest(cache_dir, {
                "format": "clipkd-teacher-cache", "version": 1, "views": self.settings.cache_views,
                "dtype": self.settings.cache_dtype, "dim": self.dim, "units": [u.name for u in self.units],
                **{k: self.provenance[k] for k in ("teacher", "teacher_checkpoint", "teacher_sha256",
                                                    "teacher_logit_scale", "view_spec")},
                "seed": self.settings.seed, "num_samples": num_samples,
            })
        summary = {
            "samples": num_samples, "labelled": labelled, "unlabelled": num_samples - labelled,
            "classes": len(kept), "concepts_searched": len(self.names), "skipped": dict(sorted(skipped.items())),
            "seen": seen, "max_bad_fraction": self.settings.max_bad_fraction,
            "processes": self.dist.world_size, "seconds": round(labelled_seconds, 1),
            "images_per_second": round(num_samples / max(labelled_seconds, 1e-9), 1),
            "cache_views": self.settings.cache_views,
        }
        write_json_atomic(self.out / "summary.json", summary)
        return summary

    def _write_labels(self, loaded: list[tuple[str, dict, dict]], kept: torch.Tensor) -> None:
        with_truth = any(any(meta["truth"]) for _, _, meta in loaded)

        def write(stream) -> None:
            header = ["key", "label", "concept", "score", "margin"] + (["truth"] if with_truth else [])
            stream.write(("\t".join(header) + "\n").encode())
            for _, tensors, meta in loaded:
                concepts = tensors["concept"]
                nearest = Nearest(concepts, tensors["score"], tensors["margin"])
                passed = assign_labels(nearest, self.settings.min_score, self.settings.min_margin)
                labels = renumber(passed, kept, len(self.names))
                for row, key in enumerate(meta["keys"]):
                    fields = [key, str(int(labels[row])), self.names[int(concepts[row])],
                              f"{float(tensors['score'][row]):.6f}", f"{float(tensors['margin'][row]):.6f}"]
                    stream.write(("\t".join(fields + ([meta["truth"][row]] if with_truth else [])) + "\n").encode())

        write_atomic(self.out / LABELS_FILE, write)


def label_dataset(settings: LabelSettings) -> dict:
    """Run the labelling pass (single process or one rank under torchrun); returns the summary on rank 0."""
    from clipkd_dino.train.distributed import shutdown_distributed

    labelling = None
    try:
        labelling = LabelPass(settings)
        return labelling.run()
    finally:
        if labelling is not None and labelling.lock:
            labelling.lock.release()
        shutdown_distributed()
