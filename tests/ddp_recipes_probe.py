"""Under torchrun: train each recipe family for a few steps in one process group (DDP on every process); record
what each rank drew from its random stream, how far its weights are from rank 0's, and how far DDP's gradient of a
batch per rank is from one process's gradient of the ranks' batches together (`gradient_gap`). Every recipe but
the last distils from the base config's cache, the last from the online teacher with every term.
`python ddp_recipes_probe.py BASE.yaml OUT_DIR`."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import yaml

import clipkd_dino.engine.loop as engine_loop
from clipkd_dino.config import load_config
from clipkd_dino.engine.distributed import finish_process, gathered_objects, shutdown_distributed
from clipkd_dino.train.trainer import Trainer

TEACHER = Path(__file__).resolve().parents[1] / "assets" / "toy_teacher.pt"

NO_TERMS = {"task": 0.0, "crd": 0.0, "icl": 0.0, "fd": 0.0, "mfd": 0.0, "gd": 0.0, "afd": 0.0, "dino": 0.0,
            "dino_text": 0.0}
RECIPES = {name: {name: 1.0} for name in NO_TERMS} | {"clipkd+dino": {"task": 1.0, "crd": 1.0, "icl": 1.0,
                                                                      "fd": 1.0, "dino": 1.0},
                                                      "online": dict.fromkeys(NO_TERMS, 1.0)}
GATHER = "clipkd_dino.distill.distiller.all_gather_with_grad"


def gradient_gap(trainer: Trainer) -> tuple[float, str]:
    """(largest gap, parameter): max |DDP's gradient - one process's| / max |one process's|, per parameter, where
    DDP's is that of the first batch of epoch 0 on each rank (averaged over ranks) and one process's is that of the
    ranks' batches concatenated in rank order, with the distiller's all-gathers as identities.

    Both in eval mode: the dino projector's dropout and MFD's patch dropout draw from each rank's own stream, and its
    BatchNorm normalises each rank's batch by that batch's statistics (not synced), which legitimately differ from
    the concatenated batch's; in eval mode both are deterministic (running statistics: the same on every rank, DDP
    broadcasts buffers from rank 0). One micro-batch per rank: no accumulation.
    """
    batches = trainer.data.epoch_batches(0)
    local = {k: v for k, v in next(batches).items() if isinstance(v, torch.Tensor)}
    batches.close()
    union = {k: torch.cat([batch[k] for batch in gathered_objects(local)]) for k in local}
    objective = trainer.objective.eval()
    if hasattr(objective, "_masked_visual"):  # MFD's masked tower, outside the module tree
        objective._masked_visual.eval()
    params = dict(objective.named_parameters())
    grads = []
    for module, batch, gathers in ((trainer.wrapped, local, contextlib.nullcontext()),
                                   (objective, union, mock.patch(GATHER, lambda t: t))):
        objective.zero_grad()
        with gathers:
            sum(module(batch).values()).backward()
        grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()})
    ddp, one = grads
    gaps = {n: float((ddp[n] - one[n]).abs().max() / one[n].abs().max().clamp(min=1e-8)) for n in params}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def rank_gap(trainer: Trainer) -> float:
    """max |this rank's weights - rank 0's|."""
    weights = [p.detach() for p in trainer.objective.parameters()]
    return max(float((mine - first).abs().max()) for mine, first in zip(weights, gathered_objects(weights)[0]))


def main(base: str, out: str) -> None:
    raw = yaml.safe_load(Path(base).read_text())
    rank = int(os.environ["RANK"])
    engine_loop.shutdown_distributed = lambda: None  # one process group for every recipe
    report = {}
    for name, weights in RECIPES.items():
        config = Path(out) / f"{name}.yaml"
        if rank == 0:  # written whole, then renamed: the other rank never reads half a file
            partial = config.with_suffix(".partial")
            teacher = {"cache": None, "teacher_pretrained": str(TEACHER)} if name == "online" else {}
            partial.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], "output_dir": str(Path(out) / name)},
                                               "distill": {**raw["distill"], **teacher,
                                                           "weights": NO_TERMS | weights}}))
            partial.replace(config)
        while not config.exists():
            time.sleep(0.01)
        trainer = Trainer(load_config(config))
        draws = torch.rand(4).tolist()  # the stream dropout and masks draw from, after set-up
        report[name] = {"steps": trainer.run()["steps"], "draws": draws,
                        "find_unused": not trainer.objective.uses_every_parameter,
                        "rank_gap": rank_gap(trainer), "gradient_gap": gradient_gap(trainer)}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit(finish_process(0))
