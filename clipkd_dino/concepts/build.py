"""Streaming pool builder: read and clean captions, parse each distinct caption once, count concept mentions, then
make the pool (`finalise`: lexicalised adjective-noun collocations, ranking, examples).

Memory holds the counts (one entry per concept, adjective, adjective-concept pair, -ing/-s form and deferred noun
run), a few example captions per entry and a bounded cache of parsed captions: it grows with the vocabulary, not
with the corpus.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipkd_dino.concepts.clean import FAULT_REASONS, REPAIR_REASONS, SKIP_REASONS, CaptionCleaner
from clipkd_dino.concepts.parser import (VERB_ENDINGS, AnalyzerSpec, Extractor, Parsed, Run, Tok, Use, model_info,
                                         resolve_model)
from clipkd_dino.concepts.pool import Collocation, ConceptPool, rank, unique
from clipkd_dino.concepts.sources import ReaderOptions, Source, expand_sources, read_captions
from clipkd_dino.data.faults import check_max_bad_fraction, enforce_bad_fraction

if TYPE_CHECKING:
    from tqdm import tqdm

    from clipkd_dino.concepts.lexicon import Lexicon

STORED_EXAMPLES = 6  # kept per concept while counting; the pool shows the first `examples` that survive filtering


@dataclass
class Tally:
    """Raw counts from a stream of parsed captions; two tallies add up exactly (`update`). Runs that may hold a verb
    read as a noun wait in `deferred` until `resolve` (the corpus decides which forms are verbs)."""

    pair_example_min: int = 10
    captions: int = 0
    tokens: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    adjectives: Counter[str] = field(default_factory=Counter)
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    pair_examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    stopped: Counter[str] = field(default_factory=Counter)
    verbs: Counter[Use] = field(default_factory=Counter)
    nouns: Counter[Use] = field(default_factory=Counter)
    deferred: Counter[Run] = field(default_factory=Counter)
    deferred_examples: dict[Run, list[str]] = field(default_factory=dict)

    def add(self, parsed: Parsed, text: str) -> None:
        """Count one caption; examples keep the adjective that preceded the mention (for collocations)."""
        self.captions += 1
        self.tokens += parsed.tokens
        for adjective, concept in parsed.mentions:
            self._count(adjective, concept, 1, (text,))
        for run in parsed.deferred:
            self.deferred[run] += 1
            stored = self.deferred_examples.setdefault(run, [])
            if len(stored) < STORED_EXAMPLES and text not in stored:
                stored.append(text)
        for mine, theirs in ((self.adjectives, parsed.adjectives), (self.stopped, parsed.stopped),
                             (self.verbs, parsed.verbs), (self.nouns, parsed.nouns)):
            mine.update(theirs)

    def resolve(self, extract: Extractor) -> None:
        """Count the deferred runs (`Extractor.split`) once the whole corpus is read. A word after the first of a
        run is a verb when the tagger read its form as a verb in more than half of the form's uses ("grazing"), or,
        for an -s form, the forms of the verb it would be one of ("grazes" is always read as a plural, but "graze",
        "grazes" and "grazing" mostly as verbs). An -ing form is a word of its own ("building", "icing"): only its
        own uses count."""
        as_verb: Counter[Use] = Counter()  # keyed by ("form", word form) and ("verb", lemma of the verb)
        as_noun: Counter[Use] = Counter()
        for uses, counter in ((self.verbs, as_verb), (self.nouns, as_noun)):
            for (form, verb), n in uses.items():
                counter["form", form] += n
                counter["verb", verb] += n

        def is_verb(tok: Tok) -> bool:
            keys = [("form", tok.lower)] + [("verb", tok.verb)] * tok.lower.endswith("s")
            return tok.lower.endswith(VERB_ENDINGS) and any(as_verb[key] > as_noun[key] for key in keys)

        verbs = frozenset(tok for _, run in self.deferred for tok in run[1:] if is_verb(tok))
        for (adjective, run), n in self.deferred.items():
            mentions, stopped = extract.split(adjective, run, verbs)
            for mention_adjective, concept in mentions:
                self._count(mention_adjective, concept, n, self.deferred_examples[adjective, run])
            for entry in stopped:
                self.stopped[entry] += n
        self.deferred.clear()
        self.deferred_examples.clear()

    def _count(self, adjective: str, concept: str, n: int, texts: Iterable[str]) -> None:
        self.counts[concept] += n
        stored = self.examples.setdefault(concept, [])
        for text in texts:
            if len(stored) < STORED_EXAMPLES and all(text != seen for seen, _ in stored):
                stored.append((text, adjective))
        if adjective:
            key = (adjective, concept)
            self.pairs[key] += n
            if self.pairs[key] >= self.pair_example_min:
                pair_stored = self.pair_examples.setdefault(key, [])
                for text in texts:
                    if len(pair_stored) < STORED_EXAMPLES and text not in pair_stored:
                        pair_stored.append(text)

    def update(self, other: Tally) -> None:
        """Add another tally (e.g. from another shard)."""
        self.captions += other.captions
        self.tokens += other.tokens
        for mine, theirs in ((self.counts, other.counts), (self.adjectives, other.adjectives),
                             (self.pairs, other.pairs), (self.stopped, other.stopped), (self.verbs, other.verbs),
                             (self.nouns, other.nouns), (self.deferred, other.deferred)):
            mine.update(theirs)
        for mine, theirs in ((self.examples, other.examples), (self.pair_examples, other.pair_examples),
                             (self.deferred_examples, other.deferred_examples)):
            for key, items in theirs.items():
                stored = mine.setdefault(key, [])
                stored.extend(item for item in items if item not in stored)
                del stored[STORED_EXAMPLES:]


class _Slot:
    """A parse result that may still be on its way from a worker."""

    __slots__ = ("value",)

    def __init__(self, value: Parsed | None = None) -> None:
        self.value = value


class StreamParser:
    """Feeds captions to the analyzer in chunks and tallies them in input order.

    A cache (first in, first out, `cache_size` distinct captions; 0 turns it off) makes each repeated caption
    parsed once. With workers, up to two chunks per worker are in flight while the next ones are read.
    """

    def __init__(self, spec: AnalyzerSpec, tally: Tally, *, workers: int, cache_size: int, chunk_size: int,
                 on_chunk: Callable[[int], object] = lambda n: None) -> None:
        self.tally, self.cache_size, self.chunk_size, self.on_chunk = tally, cache_size, chunk_size, on_chunk
        self.parsed = 0
        self._cache: dict[str, _Slot] = {}
        self._chunk: list[str] = []
        self._inflight: deque[tuple[list[str], list[_Slot], list[_Slot], Future | list[Parsed]]] = deque()
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(spec,))
            self._window = 2 * workers
        else:
            self._pool, self._window, self._analyzer = None, 0, spec.create()

    def add(self, text: str) -> None:
        self._chunk.append(text)
        if len(self._chunk) >= self.chunk_size:
            self._submit()

    def finish(self) -> None:
        """Parse and tally everything still buffered."""
        self._submit()
        while self._inflight:
            self._drain()

    def shutdown(self) -> None:
        """Stop the workers (pending work is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def _submit(self) -> None:
        texts, self._chunk = self._chunk, []
        if not texts:
            return
        slots, misses, miss_slots = [], [], []
        for text in texts:
            slot = self._cache.get(text)
            if slot is None:
                slot = _Slot()
                misses.append(text)
                miss_slots.append(slot)
                if self.cache_size:
                    self._cache[text] = slot
            slots.append(slot)
        while len(self._cache) > self.cache_size:
            del self._cache[next(iter(self._cache))]
        self.parsed += len(misses)
        work = self._pool.submit(_worker_parse, misses) if self._pool else self._analyzer.parse(misses)
        self._inflight.append((texts, slots, miss_slots, work))
        while len(self._inflight) > self._window:
            self._drain()

    def _drain(self) -> None:
        texts, slots, miss_slots, work = self._inflight.popleft()
        for slot, parsed in zip(miss_slots, work.result() if isinstance(work, Future) else work):
            slot.value = parsed
        for text, slot in zip(texts, slots):
            self.tally.add(slot.value, text)
        self.on_chunk(len(texts))


_WORKER_ANALYZER = None


def _worker_init(spec: AnalyzerSpec) -> None:
    global _WORKER_ANALYZER
    _WORKER_ANALYZER = spec.create()


def _worker_parse(texts: list[str]) -> list[Parsed]:
    return _WORKER_ANALYZER.parse(texts)


@dataclass(frozen=True)
class BuildOptions:
    """Settings of a build. Those in `settings()` change the concepts; the others only the speed."""

    phrases: bool = False
    max_words: int = 3
    max_chars: int = 500
    top_k: int | None = 1000
    min_count: int = 5
    examples: int = 3
    collocation: Collocation = Collocation()
    stoplist: Path | None = None
    aliases: Path | None = None
    nouns: Path | None = None
    adjectives: Path | None = None
    reader: ReaderOptions = ReaderOptions()
    model: str | None = None
    pipeline: str = "fast"
    numpy_blas: bool | None = None  # None: numpy's BLAS for the fast pipeline, blis for the full one
    batch_size: int = 256
    chunk_size: int = 2048
    cache_size: int = 200_000
    workers: int = 1
    progress: bool = True
    max_bad_fraction: float | None = None  # stop once more than this fraction of the captions read were faulty

    def settings(self, files: dict[str, dict[str, str]]) -> dict[str, object]:
        return {
            "phrases": self.phrases, "max_words": self.max_words, "max_chars": self.max_chars,
            "collocation": self.collocation.describe() if self.phrases else None, **files,
        }


def build_pool(patterns: Sequence[str], options: BuildOptions) -> ConceptPool:
    """Build a concept pool from caption files (paths or brace patterns)."""
    from clipkd_dino.concepts.lexicon import Lexicon

    check_max_bad_fraction(options.max_bad_fraction, "--max-bad-fraction")
    sources = expand_sources(patterns)
    lexicon = Lexicon.load(options.stoplist, options.aliases, options.nouns, options.adjectives)
    model = resolve_model(options.model)
    spec = AnalyzerSpec(model, options.pipeline, options.batch_size, options.phrases, options.max_words,
                        options.stoplist, options.aliases, options.nouns, options.adjectives, options.numpy_blas)
    problems: Counter[str] = Counter()
    tally = Tally(pair_example_min=options.collocation.min_count)
    with _progress(options.progress) as bar:
        stream = StreamParser(spec, tally, workers=options.workers, cache_size=options.cache_size,
                              chunk_size=options.chunk_size, on_chunk=bar.update)
        started = time.perf_counter()
        try:
            for caption in _cleaned(sources, options, problems):
                stream.add(caption)
            stream.finish()
        finally:
            stream.shutdown()
    tally.resolve(Extractor(lexicon, options.phrases, options.max_words))
    seconds = time.perf_counter() - started
    run = {"seconds": round(seconds, 2), "captions_per_second": round(tally.captions / max(seconds, 1e-9), 1),
           "distinct_parsed": stream.parsed, "pipeline": options.pipeline, "workers": options.workers,
           "batch_size": options.batch_size, "cache_size": options.cache_size, "top_k": options.top_k,
           "min_count": options.min_count, "max_bad_fraction": options.max_bad_fraction}
    return finalise(tally, lexicon, options, problems, settings=options.settings(lexicon.files),
                    spacy=model_info(model, options.pipeline), sources=[s.describe() for s in sources], run=run)


def finalise(tally: Tally, lexicon: Lexicon, options: BuildOptions, problems: Counter[str], *, settings: dict,
             spacy: dict, sources: list[dict], run: dict) -> ConceptPool:
    """Resolve collocations, rank, cut to top-k / min-count and attach examples."""
    counts = Counter(tally.counts)
    examples = {concept: list(items) for concept, items in tally.examples.items()}
    found = _collocations(tally, options.collocation) if options.phrases else {}
    for (adjective, concept), count in sorted(tally.pairs.items()):
        if (adjective, concept.partition(" ")[0]) not in found:
            continue
        words = (adjective, *concept.split())
        joined = lexicon.normalise(words)
        if len(words) > options.max_words or lexicon.stop_entry(joined) is not None:
            continue
        counts[concept] -= count
        counts[joined] += count
        stored = examples.setdefault(joined, [])
        stored.extend((text, "") for text in tally.pair_examples.get((adjective, concept), []))
        examples[concept] = [item for item in examples.get(concept, []) if item[1] != adjective]
    ranked = rank(counts, options.top_k, options.min_count)
    concepts = [{"concept": c, "count": n, "examples": unique([t for t, _ in examples.get(c, [])])[: options.examples]}
                for c, n in ranked]
    stats = {
        "captions_read": sum(source["captions"] for source in sources),
        "captions_used": tally.captions, "tokens": tally.tokens, "mentions": sum(counts.values()),
        "vocabulary": sum(1 for n in counts.values() if n > 0),
        "skipped": {reason: problems[reason] for reason in SKIP_REASONS if problems[reason]},
        "repaired": {reason: problems[reason] for reason in REPAIR_REASONS if problems[reason]},
        "stopped": dict(tally.stopped.most_common(30)),
    }
    colls = [{"phrase": f"{a} {n}", **values} for (a, n), values in sorted(found.items())]
    return ConceptPool(concepts, settings, spacy, sources, stats, colls, run)


def _collocations(tally: Tally, rule: Collocation) -> dict[tuple[str, str], dict[str, float]]:
    """Adjective-noun pairs that pass the rule, keyed by (adjective, first word of the concept)."""
    pair_counts: Counter[tuple[str, str]] = Counter()
    for (adjective, concept), count in tally.pairs.items():
        pair_counts[adjective, concept.partition(" ")[0]] += count
    first_words: Counter[str] = Counter()
    for concept, count in tally.counts.items():
        first_words[concept.partition(" ")[0]] += count
    found, total = {}, max(tally.tokens, 1)
    for (adjective, noun), count in pair_counts.items():
        if count < rule.min_count:
            continue
        share = count / tally.adjectives[adjective]
        p_pair = count / total
        pmi = math.log(p_pair / (tally.adjectives[adjective] / total * first_words[noun] / total))
        npmi = pmi / -math.log(p_pair)
        if share >= rule.min_share and npmi >= rule.min_npmi:
            found[adjective, noun] = {"count": count, "share": round(share, 3), "npmi": round(npmi, 3)}
    return found


def _cleaned(sources: Iterable[Source], options: BuildOptions, problems: Counter[str]) -> Iterable[str]:
    """The cleaned captions; with `max_bad_fraction`, stops once too many of the records read were faults (a record
    is a caption, a malformed row or a broken shard: each is kept or skipped under one reason)."""
    clean = CaptionCleaner(options.max_chars, problems)
    limit, kept = options.max_bad_fraction, 0

    def judge(final: bool = False) -> None:
        seen = kept + sum(problems[reason] for reason in SKIP_REASONS)
        faults = {reason: problems[reason] for reason in FAULT_REASONS if problems[reason]}
        enforce_bad_fraction(faults, seen, limit, "caption sources", final)

    for source in sources:
        for raw in read_captions(source, options.reader, problems):
            text = clean(raw)
            if text is not None:
                kept += 1
                yield text
            if limit is not None:
                judge()
    judge(final=True)


def _progress(enabled: bool) -> tqdm:
    from tqdm import tqdm

    return tqdm(desc="parsing", unit=" captions", unit_scale=True, disable=not enabled, smoothing=0.1)
