"""Launchers beyond torchrun on one node: `srun` tasks (SLURM's variables, no torchrun) form one job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import yaml

from clipkd_dino.train.distributed import adopt_slurm_environment, first_host
from conftest import REPO


def test_slurm_node_lists_and_variables_map_to_torchrun_names():
    assert first_host("gpu[007-010,012],cpu1") == "gpu007" and first_host("node1,node2") == "node1"
    assert first_host("a-b[3]") == "a-b3"
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "8(x2)",
             "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"}
    environ = dict(slurm)
    assert adopt_slurm_environment(environ)
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")} == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                                        "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu007",
                                                        "MASTER_PORT": "33742"}
    under_torchrun = dict(slurm, RANK="0", WORLD_SIZE="2")  # torchrun inside an srun step: its names win
    assert not adopt_slurm_environment(under_torchrun) and under_torchrun["WORLD_SIZE"] == "2"
    one_task = dict(slurm, SLURM_NTASKS="1")
    assert not adopt_slurm_environment(one_task) and "RANK" not in one_task


def test_two_srun_tasks_without_torchrun_train_one_job(tmp_path, toyworld_dir):
    config = {"model": {"name": "toy-student"},
              "data": {"train": str(toyworld_dir / "train" / "shards"), "workers": 0, "augment": False},
              "optim": {"warmup_steps": 2},
              "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "output_dir": str(tmp_path / "run"),
                        "log_every_steps": 100, "eval_every_epochs": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    slurm = {"SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost",
             "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tasks = [subprocess.Popen([sys.executable, "-m", "clipkd_dino.cli", "train", str(tmp_path / "config.yaml")],
                              env=environ | slurm | {"SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)},
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for task in range(2)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 96 samples over 2 processes of batch 8: one job of 6 steps, not two single-process runs of 12
    assert summary["processes"] == 2 and summary["steps"] == 6 and summary["hosts"] == [socket.gethostname()]
