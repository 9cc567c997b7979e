"""Counts what the training process's own code does per optimiser step: host reads of tensor values (`item`,
`tolist`, `float`, `int`, `bool`, ...) and torch.distributed collectives. Run as `python sync_probe.py CONFIG OUT`,
alone or under torchrun; writes OUT.rankR.json: {"syncs": [per step], "collectives": [per step], "logged": [...]}.

Only calls made from clipkd_dino's modules count (torch's own bookkeeping, e.g. AdamW's CPU step counter, does
not); loader workers are other processes, so the data side is not counted either (it does not touch the device).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from clipkd_dino.config import load_config
from clipkd_dino.train.distributed import finish_process
from clipkd_dino.train.trainer import Trainer

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce_scatter",
               "all_to_all", "gather", "scatter")
counts = {"syncs": 0, "collectives": 0}


def ours() -> bool:
    return sys._getframe(2).f_globals.get("__name__", "").startswith("clipkd_dino")


def counted(kind: str, function):
    def wrapper(*args, **kwargs):
        if ours():
            counts[kind] += 1
        return function(*args, **kwargs)
    return wrapper


def main(config: str, out: str) -> None:
    for name in HOST_READS:
        setattr(torch.Tensor, name, counted("syncs", getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        setattr(dist, name, counted("collectives", getattr(dist, name)))
    trainer = Trainer(load_config(config))
    per_step = {"syncs": [], "collectives": []}
    step = trainer._optimizer_step

    def counting_step(skip: bool) -> float:
        lr = step(skip)
        for kind in per_step:
            per_step[kind].append(counts[kind])
            counts[kind] = 0
        return lr

    trainer._optimizer_step = counting_step
    trainer.run()
    rank = os.environ.get("RANK", "0")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(per_step))


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit(finish_process(0))
