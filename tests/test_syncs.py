"""The step's host synchronisations and collectives, counted on the CPU (one process and two): at most one host
read per optimiser step outside logging steps; a fixed handful of collectives (the feature gathers and the one
status exchange)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PROBE = Path(__file__).parent / "sync_probe.py"


def _config(tmp_path: Path, toyworld_dir: Path, label_dir: Path | None) -> Path:
    config = {
        "model": {"name": "toy-student"},
        "data": {"train": str(toyworld_dir / "train" / "shards"), "num_samples": 96, "workers": 1},
        "optim": {"warmup_steps": 2, "accum_steps": 2},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "output_dir": str(tmp_path / "run"),
                  "log_every_steps": 4, "eval_every_epochs": 0},
    }
    if label_dir is not None:
        config["distill"] = {"teacher": "toy-teacher", "cache": str(label_dir), "labels": str(label_dir),
                             "weights": {"dino": 1.0, "dino_text": 1.0}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(tmp_path: Path, config: Path, processes: int, mode: str = "clip") -> list[dict]:
    command = [sys.executable, str(PROBE), str(config), str(tmp_path / "counts"), mode]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *command[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent,
                            env=os.environ | {"PYTHONPATH": str(REPO)})  # this checkout's package
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"counts.rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.parametrize("distill, processes", [(False, 1), (True, 2)])  # plain CLIP alone, distillation under DDP
def test_one_host_sync_per_step_outside_logging_steps(tmp_path, toyworld_dir, processes, distill, request):
    label_dir = request.getfixturevalue("label_dir_shards") if distill else None
    for counts in _run(tmp_path, _config(tmp_path, toyworld_dir, label_dir), processes):
        steps = len(counts["syncs"])
        assert steps == 96 // (8 * processes * 2)
        # counted at the end of each optimiser step, so a log step's reads fall in the next one; the first step
        # also holds the epoch's first exchange
        quiet = [s for s in range(1, steps) if s != 1 and s % 4 != 0]
        assert quiet and all(counts["syncs"][s] <= 1 for s in quiet), [counts["sites"][s] for s in quiet]
        if processes == 1:
            assert all(counts["collectives"][s] == 0 for s in quiet), counts["collectives"]
        else:  # per micro-batch, the feature gathers forward (student image and text; the distiller also the
            # teacher's and the projected ones) and backward (those with a gradient); then the step's one exchange
            per_micro = 6 + 4 if distill else 2 + 2
            assert all(counts["collectives"][s] == 2 * per_micro + 1 for s in quiet), counts["collectives"]


def test_classification_one_host_sync_per_step_and_a_random_stream_per_rank(tmp_path):
    """The classification mode on 2 processes: the step's one exchange and one host read outside logging steps;
    each rank's dropout masks (and augmentations) drawn from a stream of its own."""
    config = tmp_path / "cls.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "cls" / "digits" / "teacher.yaml"), "model": {"student": "resnet8"},
        "data": {"train_limit": 128, "workers": 1},  # the data side in a worker, as in the CLIP runs above
        "train": {"epochs": 1, "batch_size": 8, "log_every_steps": 4, "output_dir": str(tmp_path / "run")}}))
    ranks = _run(tmp_path, config, 2, "cls")
    assert ranks[0]["dropout"] != ranks[1]["dropout"]
    for counts in ranks:
        steps = len(counts["syncs"])
        assert steps == 128 // (8 * 2)
        quiet = [s for s in range(1, steps) if s != 1 and s % 4 != 0]
        assert all(counts["syncs"][s] <= 1 for s in quiet), [counts["sites"][s] for s in quiet]
        assert all(counts["collectives"][s] == 1 for s in quiet), counts["collectives"]
