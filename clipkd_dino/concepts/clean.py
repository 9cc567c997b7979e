"""Caption cleaning: every caption is kept, repaired or skipped, and every repair or skip is counted by reason."""

from __future__ import annotations

import html
import re
from collections import Counter

SKIP_REASONS = ("empty", "invalid_utf8", "non_english", "bad_record", "missing_caption", "empty_file", "not_a_tar",
                "truncated_shard")
FAULT_REASONS = tuple(reason for reason in SKIP_REASONS if reason != "non_english")  # a filter, not a data fault
REPAIR_REASONS = ("html", "truncated")

_TAG = re.compile(r"<[^<>]{1,200}>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ENGLISH = frozenset(
    "a an the of on in with and is are at to from near next by for under over his her its their while".split()
)
# Function words of French, German, Spanish, Italian, Portuguese and Dutch that are not also English words.
_FOREIGN = frozenset(
    """le la les des une est dans avec sur et du au aux der das und ein eine mit auf im ist einem einer dem
    el los las una con del por sobre y il gli della sul nel che di um uma em com os het een op van""".split()
)


class CaptionCleaner:
    """Normalise a raw caption or reject it; `problems` counts each reason (see SKIP_REASONS, REPAIR_REASONS)."""

    def __init__(self, max_chars: int, problems: Counter[str]) -> None:
        self.max_chars, self.problems = max_chars, problems

    def __call__(self, raw: str) -> str | None:
        text = raw
        if "<" in text or "&" in text:
            text = html.unescape(_TAG.sub(" ", text))
            if text != raw:
                self.problems["html"] += 1
        text = " ".join(_CONTROL.sub(" ", text).split())
        if not text:
            return self._skip("empty")
        if not _looks_english(text):
            return self._skip("non_english")
        if len(text) > self.max_chars:
            self.problems["truncated"] += 1
            cut = text.rfind(" ", 0, self.max_chars + 1)
            text = text[: cut if cut > 0 else self.max_chars]
        return text

    def _skip(self, reason: str) -> None:
        self.problems[reason] += 1
        return None


def _looks_english(text: str) -> bool:
    """A cheap test: mostly Latin letters, and not more foreign than English function words."""
    if not text.isascii():
        letters = [char for char in text if char.isalpha()]
        if letters and sum(char < "\u0250" for char in letters) < 0.7 * len(letters):
            return False
    words = text.lower().split()
    foreign = sum(word in _FOREIGN for word in words)
    return foreign < 2 or foreign <= sum(word in _ENGLISH for word in words)
