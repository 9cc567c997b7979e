"""Device, precision and process helpers shared by training, labelling and evaluation (one code path for CPU and
CUDA)."""

from __future__ import annotations

import contextlib
import signal

import torch

from clipkd_dino.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a long job saves and stops on these (engine/guard.py)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast(device: torch.device, precision: str):
    """Mixed-precision context: bf16 on CPU or CUDA, fp16 on CUDA only, fp32 = no autocast."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision 'fp16' needs CUDA; use 'bf16' or 'fp32' on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_CLOSED_IN_WORKERS: set = set()  # open files a forked DataLoader worker must not keep (the output folder's lock)


def close_in_data_workers(handle, keep: bool = True) -> None:
    """Register (or, with keep=False, forget) a file that `init_data_worker` closes in forked workers."""
    (_CLOSED_IN_WORKERS.add if keep else _CLOSED_IN_WORKERS.discard)(handle)


def init_data_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`. A worker ignores SIGTERM / SIGINT, which a scheduler or a Ctrl-C sends to the
    whole process group: the main process decides when to stop, then shuts its workers down. It also closes its
    inherited copy of the output lock, so that a SIGKILLed run's lock is free as soon as its main process is gone
    (closing a copy keeps the lock; only an unlock would release it)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    for handle in list(_CLOSED_IN_WORKERS):
        handle.close()
