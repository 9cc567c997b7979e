"""Start-up checks that the labels, the cache and the online teacher belong together and cover `data.train`.

Each labelling output records the teacher (architecture, and the sha256 of its weights' state dict, so that the same
weights read from another file or format agree), the concept pool's sha256 and the view spec. Labels from one pass
and a cache or an online teacher from another would train the student against one teacher's embeddings and
another's classes without a word: they are refused in one line naming both. Coverage is checked per shard (per
source for CSV) from the output's `samples/sources.json`, before any sample is read; a sample that is still missing
at training time is skipped and counted (`not_labelled`, `not_in_cache`).
"""

from __future__ import annotations

import json
from pathlib import Path

from clipkd_dino.config import DataConfig, DistillConfig
from clipkd_dino.errors import ConfigError

COMPARED = (("teacher", "teacher architecture"), ("teacher_sha256", "teacher weights (sha256 of the state dict)"),
            ("pool_sha256", "concept pool (sha256)"))


def _output_record(key: str, folder: str) -> tuple[str, str, dict]:
    """(config key, where, provenance) of a labelling output: the cache manifest, else the labels' sidecar."""
    from clipkd_dino.teacher.cache import CACHE_DIR, MANIFEST
    from clipkd_dino.teacher.class_means import SIDECAR_FILE

    path = Path(folder) / (f"{CACHE_DIR}/{MANIFEST}" if key == "distill.cache" else SIDECAR_FILE)
    try:
        return key, folder, json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"config key {key!r}: cannot read {path}: {error}") from None


def check_provenance(cfg: DistillConfig, labels_dir: str | None, online_digest: str | None = None) -> None:
    """A ConfigError naming both sides when the labels, the cache and the configured teacher disagree on the
    teacher's architecture (as it builds: `NAME-quickgelu` for an OpenAI tag) or, given `online_digest` (the online
    teacher's `weights_digest`), its weights; or the labels and the cache on the concept pool."""
    records = []
    if cfg.cache:
        records.append(_output_record("distill.cache", cfg.cache))
    if labels_dir and not (cfg.cache and Path(labels_dir).resolve() == Path(cfg.cache).resolve()):
        records.append(_output_record("distill.labels", labels_dir))
    records.append(("distill.teacher", f"{cfg.teacher} {cfg.teacher_pretrained or ''}".strip(),
                    {"teacher": _architecture(cfg), "teacher_sha256": online_digest}))
    for i, (key_a, where_a, a) in enumerate(records):
        for key_b, where_b, b in records[i + 1:]:
            for field, what in COMPARED:
                if a.get(field) and b.get(field) and a[field] != b[field]:
                    raise ConfigError(
                        f"{key_a} ({where_a}) and {key_b} ({where_b}) disagree on the {what}: "
                        f"{_short(a[field])} vs {_short(b[field])}; use the teacher, labels and cache of one "
                        "`clipkd label` pass")


def _architecture(cfg: DistillConfig) -> str | None:
    """The configured teacher's architecture as it builds."""
    from clipkd_dino.models.factory import resolve
    from clipkd_dino.models.loading import HF_PREFIX

    if cfg.teacher.startswith(HF_PREFIX):
        return None
    return resolve(cfg.teacher, cfg.teacher_pretrained, download=False).name


def _short(value: str) -> str:
    return value[:12] if len(value) == 64 else value


def check_coverage(data: DataConfig, folder: str) -> None:
    """A ConfigError when a shard (a CSV source) of `data.train` is not in the labelling output `folder`."""
    from clipkd_dino.data.identity import csv_source, shard_sources
    from clipkd_dino.data.samples import data_format, expand_shards
    from clipkd_dino.teacher.labels import read_sources

    try:
        sources = read_sources(Path(folder))
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{folder}: no samples/sources.json, not the output of this version of `clipkd label`: "
                          "run it again") from None
    held = ", ".join(sorted(sources)) or "none"
    if data_format(data.train, data.format) == "csv":
        if csv_source(data.train) not in sources:
            raise ConfigError(f"data.train {data.train} (source {csv_source(data.train)!r}) was not labelled in "
                              f"{folder} (its sources: {held}): run `clipkd label` on data.train")
        return
    shards = shard_sources(expand_shards(data.train))
    missing = [shard for shard in shards if shard.name not in sources.get(shard.source, {})]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(shards)} shards of data.train were not labelled in {folder}, e.g. "
                          f"{missing[0].url} (as {missing[0].name!r}; its sources: {held}): run `clipkd label` on "
                          "data.train, joined the same way")
