"""Under torchrun: train each recipe family for a few steps in one process group (DDP on every process), and
record what each rank drew from its random stream. `python ddp_recipes_probe.py BASE.yaml OUT_DIR`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

import clipkd_dino.train.trainer as trainer_module
from clipkd_dino.config import load_config
from clipkd_dino.train.distributed import finish_process, shutdown_distributed
from clipkd_dino.train.trainer import Trainer

NO_TERMS = {"task": 0.0, "crd": 0.0, "icl": 0.0, "fd": 0.0, "mfd": 0.0, "gd": 0.0, "afd": 0.0, "dino": 0.0,
            "dino_text": 0.0}
RECIPES = {name: {name: 1.0} for name in NO_TERMS} | {"clipkd+dino": {"task": 1.0, "crd": 1.0, "icl": 1.0,
                                                                      "fd": 1.0, "dino": 1.0}}


def main(base: str, out: str) -> None:
    raw = yaml.safe_load(Path(base).read_text())
    rank = int(os.environ["RANK"])
    trainer_module.shutdown_distributed = lambda: None  # one process group for every recipe
    report = {}
    for name, weights in RECIPES.items():
        config = Path(out) / f"{name}.yaml"
        if rank == 0:  # written whole, then renamed: the other rank never reads half a file
            partial = config.with_suffix(".partial")
            partial.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], "output_dir": str(Path(out) / name)},
                                               "distill": {**raw["distill"], "weights": NO_TERMS | weights}}))
            partial.replace(config)
        while not config.exists():
            time.sleep(0.01)
        trainer = Trainer(load_config(config))
        draws = torch.rand(4).tolist()  # the stream dropout and masks draw from, after set-up
        report[name] = {"steps": trainer.run()["steps"], "draws": draws,
                        "find_unused": not trainer.objective.uses_every_parameter}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit(finish_process(0))
