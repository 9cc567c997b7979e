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


def _workers_of(agent: int) -> dict[int, int]:
    """rank -> pid of the torchrun agent's worker processes."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            environ = dict(item.split("=", 1) for item in
                           (stat.parent / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue
        if "RANK" in environ:
            workers[int(environ["RANK"])] = int(stat.parent.name)
    return workers


def test_a_rank_killed_under_max_restarts_recovers_to_the_uninterrupted_weights(tmp_path, toyworld_dir):
    """torchrun --max-restarts 1 ... --resume auto: rank 1 is killed mid-epoch, torchrun restarts the job, which
    resumes from latest.pt (every rank's data streams and random generators) and ends with the weights of a run
    that was never interrupted."""
    import os
    import signal
    import time

    def command(out: str, *extra: str) -> list[str]:
        config = write_config(tmp_path / out, toyworld_dir, train={"checkpoint_every_steps": 1},
                              data={"train": str(toyworld_dir / "train" / "shards"), "num_samples": 192})
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
                "-m", "clipkd_dino.cli", "train", str(config), "--resume", "auto"]

    reference = subprocess.run(command("reference"), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = tmp_path / "killed" / "run"
    agent = subprocess.Popen(command("killed", "--max-restarts", "1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.jsonl").exists() and
                                          len((run / "log.jsonl").read_text().splitlines()) >= 4):
        time.sleep(0.05)
    os.kill(_workers_of(agent.pid)[1], signal.SIGKILL)
    _, stderr = agent.communicate(timeout=300)
    assert agent.returncode == 0, stderr[-3000:]
    assert "will restart worker group" in stderr  # torchrun's own account of the restart
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 12 and set(steps) == set(range(1, 13))
    final = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    expected = torch.load(tmp_path / "reference" / "run" / "checkpoints" / "epoch_1.pt",
                          weights_only=True)["state_dict"]
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, msg=name)
