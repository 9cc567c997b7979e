"""The concept pool: a versioned JSON file with settings, provenance and concepts in rank order; ranking concepts
and merging pools."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clipkd_dino import __version__
from clipkd_dino.errors import UserError
from clipkd_dino.files import write_json_atomic

FORMAT = "clipkd-concept-pool"
VERSION = 1


@dataclass(frozen=True)
class Collocation:
    """When an adjective + noun is one concept ("hot dog"): frequent, and the adjective mostly occurs there.

    share = count(adjective, noun) / count(adjective); npmi = normalised pointwise mutual information of the pair
    over the caption tokens. Counted for the noun that follows the adjective (the first word of its concept).
    """

    min_count: int = 10
    min_share: float = 0.5
    min_npmi: float = 0.5

    def describe(self) -> dict[str, float]:
        return {"min_count": self.min_count, "min_share": self.min_share, "min_npmi": self.min_npmi}


@dataclass
class ConceptPool:
    """A concept pool file in memory. `concepts` is in rank order: {"concept", "count", "examples"}."""

    concepts: list[dict]
    settings: dict
    spacy: dict
    sources: list[dict]
    stats: dict
    collocations: list[dict] = field(default_factory=list)
    run: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "created_by": f"clipkd-dino {__version__}",
                "settings": self.settings, "spacy": self.spacy, "sources": self.sources, "stats": self.stats,
                "collocations": self.collocations, "run": self.run, "concepts": self.concepts}

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_json(), indent=1, ensure_ascii=False)

    @classmethod
    def load(cls, path: Path) -> ConceptPool:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"cannot read concept pool {path}: {error}") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} is not a concept pool file (format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise UserError(f"{path}: concept pool version {data.get('version')} is not supported (need {VERSION})")
        concepts = data.get("concepts")
        if not isinstance(concepts, list) or not all(isinstance(e, dict) and {"concept", "count"} <= e.keys()
                                                     for e in concepts):
            raise UserError(f"{path}: 'concepts' must be a list of {{'concept', 'count', 'examples'}} entries")
        for entry in concepts:
            entry.setdefault("examples", [])
        return cls(concepts, data.get("settings", {}), data.get("spacy", {}), data.get("sources", []),
                   data.get("stats", {}), data.get("collocations", []), data.get("run", {}))

    def names(self) -> list[str]:
        return [entry["concept"] for entry in self.concepts]


def rank(counts: Counter[str], top_k: int | None, min_count: int) -> list[tuple[str, int]]:
    """Concepts with at least `min_count`, by count then alphabetically, the first `top_k`."""
    ranked = sorted(((c, n) for c, n in counts.items() if n >= max(min_count, 1)), key=lambda cn: (-cn[1], cn[0]))
    return ranked[:top_k] if top_k else ranked


def merge_pools(pools: list[ConceptPool], top_k: int | None, min_count: int) -> ConceptPool:
    """Combine pools built with the same settings and model: counts add, examples and sources concatenate.

    A concept cut from one pool (below its top-k or min-count) counts 0 there, so merged counts are lower bounds.
    """
    first = pools[0]
    for other in pools[1:]:
        _require_same(first, other)
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for pool in pools:
        for entry in pool.concepts:
            counts[entry["concept"]] += entry["count"]
            examples[entry["concept"]] = unique(examples.get(entry["concept"], []) + entry["examples"])
    keep = max((len(e["examples"]) for pool in pools for e in pool.concepts), default=0)
    concepts = [{"concept": c, "count": n, "examples": examples[c][:keep]} for c, n in rank(counts, top_k, min_count)]
    return ConceptPool(
        concepts, settings=first.settings, spacy=first.spacy,
        sources=[source for pool in pools for source in pool.sources],
        stats=_sum_stats([pool.stats for pool in pools]),
        collocations=_merge_collocations([pool.collocations for pool in pools]),
        run={"merged_from": len(pools)},
    )


def _require_same(a: ConceptPool, b: ConceptPool) -> None:
    if a.settings != b.settings:
        keys = sorted(k for k in set(a.settings) | set(b.settings) if a.settings.get(k) != b.settings.get(k))
        raise UserError(f"cannot merge pools built with different settings: {', '.join(keys)}")
    if a.spacy.get("files_sha256") != b.spacy.get("files_sha256"):
        raise UserError(f"cannot merge pools built with different spaCy models: {a.spacy.get('name')} "
                        f"{a.spacy.get('version')} vs {b.spacy.get('name')} {b.spacy.get('version')}")


def _sum_stats(all_stats: list[dict]) -> dict:
    merged: dict = {}
    for stats in all_stats:
        for key, value in stats.items():
            if isinstance(value, dict):
                inner = Counter(merged.get(key, {}))
                inner.update(value)
                merged[key] = dict(inner)
            elif key != "vocabulary":
                merged[key] = merged.get(key, 0) + value
    return merged


def _merge_collocations(lists: list[list[dict]]) -> list[dict]:
    counts: Counter[str] = Counter()
    for entries in lists:
        for entry in entries:
            counts[entry["phrase"]] += entry["count"]
    return [{"phrase": phrase, "count": count} for phrase, count in sorted(counts.items())]


def unique(items: list[str]) -> list[str]:
    """`items` without repeats, in order."""
    return list(dict.fromkeys(items))


def format_table(pool: ConceptPool, rows: int, width: int = 100) -> str:
    """The top of a pool as a text table, after a short header."""
    spacy, stats = pool.spacy, pool.stats
    lines = [
        f"{len(pool.concepts)} concepts from {len(pool.sources)} source(s), {stats.get('captions_used', 0):,} "
        f"captions; phrases={pool.settings.get('phrases')}; spaCy {spacy.get('name')} {spacy.get('version')}",
        f"{'rank':>5}  {'count':>8}  {'concept':<24}  example",
    ]
    for rank_, entry in enumerate(pool.concepts[:rows], start=1):
        example = entry["examples"][0] if entry["examples"] else ""
        room = max(width - 45, 10)
        example = example if len(example) <= room else example[: room - 3] + "..."
        lines.append(f"{rank_:>5}  {entry['count']:>8,}  {entry['concept']:<24}  {example}")
    return "\n".join(lines)
