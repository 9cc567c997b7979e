"""What eval readers do with a data fault: count it under its reason with --skip-bad, else stop naming it."""

from __future__ import annotations

from collections import Counter

from clipkd_dino.errors import UserError


def skip_or_raise(problems: Counter, reason: str, message: str, skip_bad: bool) -> None:
    """Count `reason` in `problems` when `skip_bad`; else a one-line UserError with `message` (naming the file)."""
    if not skip_bad:
        raise UserError(f"{message} (--skip-bad skips it)")
    problems[reason] += 1
