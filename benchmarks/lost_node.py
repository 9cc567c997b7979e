"""A lost node under `torchrun --max-restarts 1 ... --resume auto` (docs/cluster.md), checked by hand.

    python benchmarks/lost_node.py [--shared-store]

Two torchrun agents on this machine act as two nodes (`--nnodes 2`, c10d on localhost, one process each) and train
the toy student on a 96-image toyworld for 15 steps, saving `latest.pt` at every step. First uninterrupted; then
again, with node 1's worker killed (SIGKILL) once 5 steps are logged. Prints both agents' exit codes, where each
restarted group resumed, the last logged step and the largest weight difference from the uninterrupted run.
By default the agents run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a store per worker group, as docs/cluster.md
asks); `--shared-store` leaves torch's default (one store for every group) to show what goes wrong without it.
Takes 3-4 minutes a run on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 15  # 96 images x 5 captions, batch 16 on 2 processes


def write_config(folder: Path) -> Path:
    from clipkd_dino.toyworld.generate import generate

    generate(folder / "toyworld", n_train=96, n_val=24, image_size=48, seed=0, workers=1, shard_size=32)
    config = {"model": {"name": "toy-student"},
              "data": {"train": str(folder / "toyworld" / "train" / "captions.csv"), "workers": 0, "augment": False},
              "optim": {"warmup_steps": 2},
              "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "log_every_steps": 1,
                        "eval_every_epochs": 0, "checkpoint_every_steps": 1}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_agents(config: Path, output_dir: Path, logs: Path, environ: dict[str, str]) -> list[subprocess.Popen]:
    """Two torchrun agents as the two nodes of one `clipkd train CONFIG --resume auto` job, --max-restarts 1."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"lost-{port}",
               "--max-restarts", "1", "-m", "clipkd_dino.cli", "train", str(config), f"train.output_dir={output_dir}",
               "--resume", "auto"]
    return [subprocess.Popen(command, cwd=REPO, env=environ, stderr=subprocess.STDOUT,
                             stdout=(logs / f"{output_dir.name}_agent{node}.txt").open("w")) for node in range(2)]


def workers_of(agent: int) -> list[int]:
    """The pids of the processes the agent `agent` started."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == agent:
                children.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            pass
    return children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-store", action="store_true", help="leave torch's one store for every group")
    args = parser.parse_args()
    environ = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    if not args.shared_store:
        environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    folder = Path(tempfile.mkdtemp(prefix="clipkd_lost_node_"))
    config = write_config(folder)
    reference = start_agents(config, folder / "reference", folder, environ)
    print("uninterrupted: agents exit", [agent.wait() for agent in reference])

    start = time.time()
    agents = start_agents(config, folder / "run", folder, environ)
    log = folder / "run" / "log.jsonl"
    while all(a.poll() is None for a in agents) and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    for pid in workers_of(agents[1].pid):
        os.kill(pid, signal.SIGKILL)
    print(f"killed node 1's worker after {len(log.read_text().splitlines())} logged steps; agents exit",
          [agent.wait() for agent in agents], f"after {time.time() - start:.0f} s")
    for node in range(2):
        text = (folder / f"run_agent{node}.txt").read_text()
        print(f"node {node}: resumed at", re.findall(r"resuming at step (\d+)", text),
              "gloo errors:", text.count("Gloo connectFullMesh failed"))
    print("last logged step", yaml.safe_load(log.read_text().splitlines()[-1])["step"], "of", STEPS)
    resumed, expected = (torch.load(folder / run / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
                         for run in ("run", "reference"))
    print("largest weight difference", max(float((resumed[k] - expected[k]).abs().max()) for k in expected))
    print("outputs and agent logs in", folder)


if __name__ == "__main__":
    main()
