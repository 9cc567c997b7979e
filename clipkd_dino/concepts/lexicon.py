"""The editable word lists that shape concepts: the stop list, the alias list, the noun list and the adjective list."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from clipkd_dino.errors import UserError

SHIPPED_STOPLIST = Path(__file__).with_name("stoplist.txt")
SHIPPED_ALIASES = Path(__file__).with_name("aliases.txt")
SHIPPED_NOUNS = Path(__file__).with_name("nouns.txt")
SHIPPED_ADJECTIVES = Path(__file__).with_name("adjectives.txt")


@dataclass(frozen=True)
class Lexicon:
    """Stop entries, compounds kept despite a stop-word head, aliases keyed by word tuples, forced nouns and
    pre-nominal adjectives."""

    stop: frozenset[str]
    keep: frozenset[str]
    aliases: dict[tuple[str, ...], str]
    nouns: frozenset[str]
    adjectives: frozenset[str]
    files: dict[str, dict[str, str]]

    @classmethod
    def load(cls, stoplist: Path | None = None, aliases: Path | None = None, nouns: Path | None = None,
             adjectives: Path | None = None) -> Lexicon:
        """Read the stop list, the alias list, the noun list and the adjective list (the shipped ones by default)."""
        stoplist, aliases = Path(stoplist or SHIPPED_STOPLIST), Path(aliases or SHIPPED_ALIASES)
        nouns, adjectives = Path(nouns or SHIPPED_NOUNS), Path(adjectives or SHIPPED_ADJECTIVES)
        stop, keep = set(), set()
        for line in _entries(stoplist):
            (keep if line.startswith("!") else stop).add(_words(line.lstrip("!")))
        alias_map = {}
        for line in _entries(aliases):
            variant, sep, canonical = line.partition("\t")
            if not sep or not canonical.strip():
                raise UserError(f"{aliases}: expected 'variant<TAB>canonical', got {line!r}")
            alias_map[tuple(_words(variant).split())] = _words(canonical)
        files = {"stoplist": _describe(stoplist), "aliases": _describe(aliases), "nouns": _describe(nouns),
                 "adjectives": _describe(adjectives)}
        return cls(frozenset(stop), frozenset(keep), alias_map, frozenset(map(_words, _entries(nouns))),
                   frozenset(map(_words, _entries(adjectives))), files)

    def normalise(self, words: tuple[str, ...]) -> str:
        """Join words into a concept, replacing alias variants (longest match first)."""
        if not self.aliases:
            return " ".join(words)
        out, i = [], 0
        while i < len(words):
            for size in range(min(self.longest_alias, len(words) - i), 0, -1):
                canonical = self.aliases.get(words[i : i + size])
                if canonical is not None:
                    out.append(canonical)
                    i += size
                    break
            else:
                out.append(words[i])
                i += 1
        return " ".join(out)

    @cached_property
    def longest_alias(self) -> int:
        return max(map(len, self.aliases), default=0)

    def noun_tag(self, word: str, tag: str) -> str:
        """The tag the definition uses: listed nouns are nouns (NN, NNS for an s/es plural) and a lowercase word
        tagged as a proper noun is a common noun (captions rarely capitalise; "teddy", "frisbee")."""
        lower = word.lower()
        if lower in self.nouns:
            return "NN"
        if lower.endswith("s") and (lower[:-1] in self.nouns or (lower.endswith("es") and lower[:-2] in self.nouns)):
            return "NNS"
        if tag in ("NNP", "NNPS") and word.islower():
            return "NN" if tag == "NNP" else "NNS"
        return tag

    def stop_entry(self, concept: str) -> str | None:
        """The stop entry that removes `concept` (itself or its last word), or None when it is kept."""
        if concept in self.keep:
            return None
        if concept in self.stop:
            return concept
        head = concept.rpartition(" ")[2]
        return head if head in self.stop else None


def _entries(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read word list {path}: {error}") from error
    lines = (line.split("#", 1)[0].rstrip() for line in text.splitlines())
    return [line for line in lines if line.strip()]


def _words(text: str) -> str:
    return " ".join(text.lower().split())


def _describe(path: Path) -> dict[str, str]:
    shipped = path.resolve().parent == Path(__file__).resolve().parent
    return {"path": f"<shipped>/{path.name}" if shipped else str(path), "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
