"""What keeps a long run safe, used by the run engine (`engine.loop`) and the labelling pass.

- `OutputLock`: one run per output folder (a second one stops with a clear error instead of mixing files).
- `StopSignals`: SIGTERM / SIGINT ask the loop to save `latest` and stop at the next step boundary.
- `NonFiniteGuard`: a step whose loss or gradient is not finite is skipped with a warning
  naming the term; a streak of them stops the run, so no NaN ever reaches the weights or a checkpoint.
- `stop_on_bad_fraction`: the `max_bad_fraction` stop, agreed across ranks.
- `save_checkpoint`: atomic, refuses non-finite weights, and turns a failed write (a full disk) into a one-line error
  that says the previous checkpoint is intact.
All decisions are agreed across torch.distributed ranks, so every process skips or stops at the same step.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from clipkd_dino.data.faults import TooManyBadSamples, bad_fraction_exceeded, enforce_bad_fraction
from clipkd_dino.errors import RunStopped, UserError
from clipkd_dino.runtime import STOP_SIGNALS, close_in_data_workers
from clipkd_dino.engine.checkpoint import save_atomic

LOCK_FILE = ".clipkd.lock"


class OutputLock:
    """An exclusive `flock` on OUTPUT_DIR/.clipkd.lock for the life of the process (released by the kernel even on
    SIGKILL, so a killed run never leaves a stale lock; DataLoader workers close their inherited copy, see
    `runtime.init_data_worker`, so that none outlives the killed run holding it)."""

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / LOCK_FILE
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise UserError(f"output folder {output_dir} is in use by another run (pid {owner}); give this run its "
                            "own train.output_dir, or wait for the other to finish") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        close_in_data_workers(self.handle)

    def release(self) -> None:
        close_in_data_workers(self.handle, keep=False)
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT only record themselves (`received`); the loop polls
    `received` at step boundaries. The previous handlers come back on exit."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _record(self, number: int, frame: object) -> None:
        self.received = number

    def stopped(self, where: str, saved: str, resume: str = "continue with --resume latest") -> RunStopped:
        """The exit (128 + signal) and its message: "stopped by SIGTERM WHERE; SAVED; RESUME"."""
        name = signal.Signals(self.received or signal.SIGTERM).name
        return RunStopped(f"stopped by {name} {where}; {saved}; {resume}", 128 + (self.received or signal.SIGTERM))


class NonFiniteGuard:
    """Counts skipped steps (a non-finite loss or gradient); `limit` of them in a row stop the run with a UserError."""

    def __init__(self, limit: int) -> None:
        self.limit, self.streak, self.total = limit, 0, 0

    def check(self, bad: bool, named: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Record a step whose loss or gradient was (`bad`, agreed by every process) or was not finite; a bad step
        is reported with the non-finite terms and the gradient norm, and a streak of `limit` raises."""
        if not bad:
            self.streak = 0
            return
        local = [name for name, value in named.items() if name != "loss" and not torch.isfinite(value).all()]
        if not local and not torch.isfinite(grad_norm):  # finite losses, non-finite gradients
            local.append(f"gradient (norm {float(grad_norm)})")
        self._skipped(local or ["(another process)"])

    def _skipped(self, names: list[str]) -> list[str]:
        self.streak, self.total = self.streak + 1, self.total + 1
        print(f"warning: non-finite {', '.join(names)}: step skipped ({self.streak} in a row)", file=sys.stderr)
        if self.streak >= self.limit:
            raise UserError(f"{self.streak} steps in a row had a non-finite loss ({', '.join(names)}): stopping; "
                            "the last checkpoint holds finite weights (lower the learning rate, or use fp32/bf16)")
        return names


def save_checkpoint(payload: dict[str, Any], path: Path, weights: dict[str, torch.Tensor]) -> None:
    """`save_atomic`, after checking `weights` are finite (a failed write is a UserError naming the file)."""
    bad = [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise UserError(f"refusing to write {path}: non-finite weights in {bad[0]} ({len(bad)} tensors)")
    save_atomic(payload, path)


def stop_on_bad_fraction(skipped: Mapping[str, int], seen: int, limit: float | None, what: str,
                         device: torch.device, final: bool = False) -> None:
    """`enforce_bad_fraction`, agreed across ranks: every process stops when any one has read too much bad data."""
    if any_rank(bad_fraction_exceeded(skipped, seen, limit, final), device):
        enforce_bad_fraction(skipped, seen, limit, what, final=True)
        raise TooManyBadSamples(f"{what}: another process read more than max_bad_fraction bad samples")


def any_rank(flag: bool, device: torch.device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
