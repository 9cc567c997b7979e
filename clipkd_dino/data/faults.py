"""Bad-sample accounting shared by every command that reads data: counts per reason and the `max_bad_fraction` stop.

A command skips what it cannot read, counts it under a reason ("bad_image", "missing_image", "missing_caption", ...),
reports the counts at the end and in its JSON output, and stops with `TooManyBadSamples` once more than
`max_bad_fraction` of what it has seen was bad. The fraction is judged only after `MIN_SEEN` samples (or at the end
of a pass over fewer), so that one bad sample among the first few does not stop a long job.

Caption text is decoded by one policy everywhere (`decode_text`): valid UTF-8, or the record holding it is skipped
and counted as `invalid_utf8`.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Mapping

from PIL import Image

from clipkd_dino.errors import ConfigError, UserError

MIN_SEEN = 100
# What PIL raises for a truncated, corrupt or over-large file (its plugins raise more than OSError).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, Image.DecompressionBombError)


class TooManyBadSamples(UserError):
    """More than the allowed fraction of the samples read so far were bad."""


def check_max_bad_fraction(value: float | None, key: str) -> None:
    """A ConfigError naming `key` unless `value` is None or in [0, 1]."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} must be between 0 and 1, got {value}")


def bad_fraction_exceeded(skipped: Mapping[str, int], seen: int, limit: float | None, final: bool = False) -> bool:
    """sum(skipped) / seen > limit (seen counts good and bad samples), judged once `seen >= MIN_SEEN` or, on the
    `final` call of a pass, whatever `seen` is."""
    if limit is None or seen == 0 or (seen < MIN_SEEN and not final):
        return False
    return sum(skipped.values()) / seen > limit


def enforce_bad_fraction(skipped: Mapping[str, int], seen: int, limit: float | None, what: str,
                         final: bool = False) -> None:
    """Raise TooManyBadSamples naming `what` (the data) when `bad_fraction_exceeded`."""
    if not bad_fraction_exceeded(skipped, seen, limit, final):
        return
    bad = sum(skipped.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in Counter(skipped).most_common())
    raise TooManyBadSamples(f"{what}: {bad} of {seen} samples were bad ({bad / seen:.1%} > max_bad_fraction "
                            f"{limit:g}): {reasons}")


def decode_text(raw: bytes | str) -> str | None:
    """Caption text by the one decoding policy of every reader (training, labelling, evaluation, concept pools):
    UTF-8 or nothing. `raw` is bytes, or text read with errors="surrogateescape" (undecodable bytes kept as lone
    surrogates). None when it is not valid UTF-8: the caller skips the record that holds it (a `.txt` member, a CSV
    row, a line) and counts it once as `invalid_utf8`; undecodable bytes are never replaced (U+FFFD) nor kept."""
    try:
        if isinstance(raw, str):
            raw.encode("utf-8")  # fails on lone surrogates
            return raw
        return raw.decode("utf-8")
    except UnicodeError:
        return None


def decode_captions(text: bytes | None) -> tuple[list[str], str | None]:
    """(the non-empty lines of a shard sample's `.txt` member, None), or ([], "missing_caption" | "invalid_utf8")."""
    decoded = decode_text(text or b"")
    if decoded is None:
        return [], "invalid_utf8"
    captions = [line for line in decoded.splitlines() if line.strip()]
    return captions, None if captions else "missing_caption"


def format_skipped(skipped: Mapping[str, int]) -> str:
    """'12 skipped (bad_image 10, missing_caption 2)' or 'nothing skipped'."""
    total = sum(skipped.values())
    if not total:
        return "nothing skipped"
    return f"{total} skipped (" + ", ".join(f"{r} {c}" for r, c in Counter(skipped).most_common()) + ")"


class BadSample(Exception):
    """A sample that cannot be used; `reason` is its skip reason (e.g. "bad_image")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_image(source: bytes | str | Path) -> Image.Image:
    """The decoded image (bytes of a shard member, or a file path); `BadSample` with reason "missing_image",
    "empty_file" or "bad_image" (truncated or corrupt: PIL's error is the detail) when it cannot be used."""
    if not isinstance(source, bytes):
        if not os.path.isfile(source):
            raise BadSample("missing_image")
        if os.path.getsize(source) == 0:
            raise BadSample("empty_file")
    elif not source:
        raise BadSample("empty_file")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            return image
    except _IMAGE_ERRORS as error:
        raise BadSample("bad_image", str(error)) from None
