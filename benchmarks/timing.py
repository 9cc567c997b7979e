"""The timed optimiser step shared by the step benchmarks."""

from __future__ import annotations

import time

import torch

from clipkd_dino.runtime import autocast


def seconds_per_step(objective: torch.nn.Module, batch: dict, device: torch.device, precision: str, warmup: int,
                     steps: int) -> float:
    """Mean wall seconds of forward (sum of the named losses) + backward + AdamW over `steps` after `warmup`."""
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    for index in range(warmup + steps):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast(device, precision):
            loss = sum(objective(batch).values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps
