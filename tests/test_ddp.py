"""Correctness on several processes: every recipe family trains under DDP (gloo, 2 processes), each rank draws its
own random stream, `--resume auto`, a change of world size refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clipkd_dino.config import load_config
from clipkd_dino.errors import ConfigError
from clipkd_dino.train.checkpoint import resolve_resume
from clipkd_dino.train.trainer import Trainer
from test_syncs import label_dir_shards  # noqa: F401  (the fixture: labels and a 2-view cache of the shards)
from test_train import write_config

PROBE = Path(__file__).parent / "ddp_recipes_probe.py"


def test_every_recipe_trains_under_ddp_and_ranks_draw_their_own_streams(tmp_path, toyworld_dir, label_dir_shards):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"name": "toy-student"},
        "data": {"train": str(toyworld_dir / "train" / "shards"), "num_samples": 48, "workers": 0},
        "optim": {"warmup_steps": 1, "accum_steps": 2},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "log_every_steps": 1, "eval_every_epochs": 0},
        "distill": {"teacher": "toy-teacher", "cache": str(label_dir_shards), "labels": str(label_dir_shards)},
    }))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(PROBE), str(base), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, report in ranks[0].items():
        assert report["steps"] == 3, name  # 48 samples / (4 x 2 processes x 2 micro-batches)
        assert report["draws"] != ranks[1][name]["draws"], f"{name}: both ranks drew the same masks"
    # DDP is told to look for unused parameters only where a recipe leaves some without gradient
    assert not ranks[0]["clipkd+dino"]["find_unused"] and not ranks[0]["task"]["find_unused"]
    assert ranks[0]["fd"]["find_unused"] and ranks[0]["dino"]["find_unused"]


def test_resume_auto_starts_fresh_then_resumes(tmp_path):
    latest = tmp_path / "checkpoints" / "latest.pt"
    assert resolve_resume("auto", tmp_path) is None
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == latest == resolve_resume("latest", tmp_path)


def test_a_checkpoint_of_another_world_size_is_refused_in_one_line(tmp_path, toyworld_dir):
    trainer = Trainer(load_config(write_config(tmp_path, toyworld_dir, train={"checkpoint_every_steps": 2})))
    trainer.run()
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    state["world_size"] = 8
    torch.save(state, latest)
    with pytest.raises(ConfigError, match=r"written by 8 processes and this run has 1: resume with 8") as error:
        Trainer(load_config(write_config(tmp_path, toyworld_dir)), resume="auto")
    assert "\n" not in str(error.value)
