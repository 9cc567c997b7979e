"""Device and precision helpers shared by training and evaluation (one code path for CPU and CUDA)."""

from __future__ import annotations

import contextlib

import torch

from clipkd_dino.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


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
