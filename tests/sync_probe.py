"""Counts what the training process does per optimiser step: host synchronisations and torch.distributed
collectives. Run as `python sync_probe.py CONFIG OUT [cls]` (cls: CONFIG is a `clipkd cls` config), alone or under
torchrun; writes OUT.rankR.json: {"syncs": [per step], "collectives": [per step], "sites": [per step: "operation at
file:line", ...], "dropout": the mask a dropout of rate 0.5 draws from the process's stream once set up}.

Host synchronisations are counted by a TorchFunctionMode active for the whole run, wherever they are called from
(clipkd_dino, torch's Python code, an f-string, a print, tqdm): the operations that read tensor values on the host
(`item`, `tolist`, `bool`, `int`, `float`, `index`, `format`, `repr`, `numpy`, `cpu`, `.to("cpu")`, `equal`, ...)
and those whose output size depends on tensor values (`nonzero`, `masked_select`, `unique`, indexing with a boolean
tensor, a one-argument `torch.where`, `repeat_interleave` without `output_size`, ...). On the CPU every tensor is on
the host already: an operation counts for what it does on a GPU. Hence `.to()` counts only with the CPU named as a
string: a `torch.device` target cannot be told from the training device (`.to(self.device)`, `.to(x.device)`: no
wait on a GPU). Excluded: the optimiser's step (the count is paused in it), where AdamW reads its per-parameter step
counter, a CPU tensor, with `.item()`, not a device value. Loader workers are other processes, so the data side is
not counted (it does not touch the device).

Collectives count the torch.distributed calls made from clipkd_dino's modules (DDP's gradient reduction is not).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from clipkd_dino.classify.config import load_cls_config
from clipkd_dino.classify.trainer import ClsTrainer
from clipkd_dino.config import load_config
from clipkd_dino.engine.distributed import finish_process
from clipkd_dino.engine.loop import Engine
from clipkd_dino.train.trainer import Trainer

HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__", "__str__",
              "__array__", "__contains__", "numpy", "cpu", "equal", "allclose", "is_nonzero", "nonzero", "argwhere",
              "masked_select", "unique", "unique_consecutive", "bincount"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce_scatter",
               "all_to_all", "gather", "scatter")
TORCH = str(Path(torch.__file__).parent)
counts: Counter = Counter()
sites: list[str] = []


def is_sync(func, args: tuple, kwargs: dict) -> bool:
    """Whether torch function `func` called with `args` and `kwargs` waits for the device on a GPU."""
    name = getattr(func, "__name__", "")
    if name in HOST_READS:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name in ("__getitem__", "__setitem__"):
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index)
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0])
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name == "to":
        return any(isinstance(t, str) and torch.device(t).type == "cpu" for t in (*args[1:], kwargs.get("device")))
    return False


def caller(frame) -> str:
    """file:line of `frame` or, if it is in torch or this probe, of the innermost frame outside them."""
    while frame.f_back and (frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


class SyncCounter(TorchFunctionMode):
    paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and is_sync(func, args, kwargs):
            counts["syncs"] += 1
            sites.append(f"{getattr(func, '__name__', func)} at {caller(sys._getframe(1))}")
        return func(*args, **kwargs)


def paused(function):
    """`function`, with the sync count paused while it runs."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        SyncCounter.paused += 1
        try:
            return function(*args, **kwargs)
        finally:
            SyncCounter.paused -= 1
    return wrapper


def counted_collective(function):
    def wrapper(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("clipkd_dino"):
            counts["collectives"] += 1
        return function(*args, **kwargs)
    return wrapper


def build(config: str, mode: str) -> Engine:
    if mode == "cls":
        return ClsTrainer(load_cls_config(config))
    return Trainer(load_config(config))


def main(config: str, out: str, mode: str = "clip") -> None:
    for name in COLLECTIVES:
        setattr(dist, name, counted_collective(getattr(dist, name)))
    trainer = build(config, mode)
    trainer.optimizer.step = paused(trainer.optimizer.step)
    with torch.random.fork_rng(devices=[]):
        dropout = torch.nn.functional.dropout(torch.ones(64), 0.5).tolist()
    per_step: dict[str, list] = {"syncs": [], "collectives": [], "sites": [], "dropout": dropout}
    step = trainer._optimizer_step

    def counting_step(skip: bool) -> float:
        lr = step(skip)
        per_step["syncs"].append(counts.pop("syncs", 0))
        per_step["collectives"].append(counts.pop("collectives", 0))
        per_step["sites"].append(sites.copy())
        sites.clear()
        return lr

    trainer._optimizer_step = counting_step
    with SyncCounter():
        trainer.run()
    rank = os.environ.get("RANK", "0")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(per_step))


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit(finish_process(0))
