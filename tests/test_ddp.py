"""Correctness on several processes: every recipe family trains under DDP (gloo, 2 processes), each rank draws its
own random stream, `--resume auto` (and torchrun's restart of a killed rank), a change of world size refused in one
line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from clipkd_dino.config import load_config
from clipkd_dino.errors import ConfigError
from clipkd_dino.engine.checkpoint import resolve_resume
from clipkd_dino.train.trainer import Trainer
from conftest import REPO
from test_train import read_log, write_config

PROBE = Path(__file__).parent / "ddp_recipes_probe.py"


def test_every_recipe_trains_under_ddp_like_one_process_and_ranks_draw_their_own_streams(tmp_path, toyworld_dir,
                                                                                         label_dir_shards):
    """Each recipe (every distillation term alone from the cache, CLIP-KD + dino, every term with the online teacher)
    trains on 2 processes with equal weights on both; DDP's gradient of a batch per rank is one process's gradient of
    both batches (in eval mode: dropout, MFD's masks and the dino projector's per-rank BatchNorm statistics set aside,
    see `gradient_gap` in the probe). The plain CLIP objective: test_train.py."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"name": "toy-student"},
        "data": {"train": str(toyworld_dir / "train" / "shards"), "num_samples": 48, "workers": 0},
        "optim": {"warmup_steps": 1, "accum_steps": 2},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "log_every_steps": 1, "eval_every_epochs": 0},
        "distill": {"teacher": "toy-teacher", "cache": str(label_dir_shards), "labels": str(label_dir_shards)},
    }))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(PROBE), str(base), str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env=os.environ | {"PYTHONPATH": str(REPO)})  # this checkout's package
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, report in ranks[0].items():
        assert report["steps"] == 3, name  # 48 samples / (4 x 2 processes x 2 micro-batches)
        assert report["draws"] != ranks[1][name]["draws"], f"{name}: both ranks drew the same masks"
        assert ranks[1][name]["rank_gap"] == 0.0, f"{name}: the ranks' weights differ"
        for rank in ranks:
            gap, parameter = rank[name]["gradient_gap"]
            assert gap < 1e-4, f"{name}: DDP's gradient of {parameter} is {gap:.1e} from one process's"
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
    assert state["stream"]["processes"] == 1 and len(state["rng"]) == 1
    state["stream"]["processes"] = 8
    torch.save(state, latest)
    with pytest.raises(ConfigError, match=r"--resume: .*\(processes: 8 -> 1\): resume with the saved settings, or "
                                          r"add --new-stream") as error:
        Trainer(load_config(write_config(tmp_path, toyworld_dir)), resume="auto")
    assert "\n" not in str(error.value)


def worker_pids(agent: int) -> dict[int, int]:
    """RANK -> pid of each worker process that the torchrun agent `agent` started."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if parent == agent else []
        except (OSError, ValueError, IndexError):
            continue
        rank = [item[5:] for item in environ if item.startswith(b"RANK=")]
        if rank:
            workers[int(rank[0])] = int(entry.name)
    return workers


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_a_killed_rank_and_ends_with_the_uninterrupted_weights(tmp_path, toyworld_dir):
    config = write_config(tmp_path, toyworld_dir, train={"checkpoint_every_steps": 1})  # 480 pairs: 15 steps of 2 x 16
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    train = ["-m", "clipkd_dino.cli", "train", str(config)]
    reference = subprocess.run([*torchrun, *train, f"train.output_dir={tmp_path / 'reference'}"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    log = tmp_path / "run" / "log.jsonl"
    output = (tmp_path / "torchrun.txt").open("w+")
    agent = subprocess.Popen([*torchrun, "--max-restarts", "1", *train, "--resume", "auto"], cwd=REPO,
                             stdout=output, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while agent.poll() is None and time.time() < deadline and \
            not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    os.kill(worker_pids(agent.pid)[1], signal.SIGKILL)
    assert agent.wait(timeout=300) == 0
    output.seek(0)
    resumed_at = re.findall(r"resuming at step (\d+)", output.read())
    assert len(resumed_at) == 1 and 4 <= int(resumed_at[0]) < 15, "the restarted group resumes from latest.pt"
    assert read_log(tmp_path / "run")[-1]["step"] == 15
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    expected = torch.load(tmp_path / "reference" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)


def test_finish_process_ends_a_process_of_a_group_with_its_code_and_its_output_flushed():
    """A process that joined a group ends in `finish_process` (os._exit: no finalisation, where torch's gloo
    threads can abort it), with its exit code and what it printed; any other process gets its code back."""
    script = ("import atexit, sys\n"
              "from clipkd_dino.engine import distributed\n"
              "atexit.register(print, 'finalised')\n"
              "assert distributed.finish_process(3) == 3\n"
              "distributed._joined_group = True\n"
              "print('printed', end='')\n"
              "sys.exit(distributed.finish_process(4))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (4, "printed"), result.stderr
