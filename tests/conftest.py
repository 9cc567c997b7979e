"""Shared fixtures: a small toyworld data set (generated once per session) and helpers to run the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def toyworld_dir(tmp_path_factory) -> Path:
    """A 96-image train / 24-image val toyworld at 48 px (about a second to generate)."""
    from clipkd_dino.toyworld.generate import generate

    out = tmp_path_factory.mktemp("toyworld")
    generate(out, n_train=96, n_val=24, image_size=48, seed=0, workers=1, shard_size=32)
    return out


@pytest.fixture(scope="session")
def label_dir_shards(toyworld_dir, tmp_path_factory) -> Path:
    """Labels and a 2-view cache of the toyworld shards (`label_toyworld`), read-only."""
    return label_toyworld(toyworld_dir, tmp_path_factory.mktemp("shard_labels") / "labels",
                          toyworld_dir / "train" / "shards", cache_views=2)


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python -m clipkd_dino.cli ARGS` in a subprocess, output captured as text. Each costs about 10 s of imports
    (torch, torchvision, open_clip, transformers): prefer `clipkd` unless the test needs a process of its own."""
    return subprocess.run([sys.executable, "-m", "clipkd_dino.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", REPO), **kwargs)


def clipkd(*args: str) -> subprocess.CompletedProcess:
    """`clipkd ARGS` in this process (the CLI's entry point, argv to exit code): exit code, stdout and stderr."""
    from clipkd_dino import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def torchrun_cli(nproc: int, *args: str, timeout: float = 300, nodes: int = 1) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node NPROC -m clipkd_dino.cli ARGS` on the CPU (gloo). With `nodes` > 1, that many
    torchrun agents on this machine act as the nodes of one job (`--nnodes`, c10d rendezvous on localhost), NPROC
    processes in all; the result holds the highest exit code and every agent's output."""
    if nodes == 1:
        launch = [["--standalone", "--nproc_per_node", str(nproc)]]
    else:
        import socket

        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            port = probe.getsockname()[1]
        launch = [["--nnodes", str(nodes), "--nproc_per_node", str(nproc // nodes), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "clipkd-test"]] * nodes
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *options, "-m", "clipkd_dino.cli",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
              for options in launch]
    outputs = [agent.communicate(timeout=timeout) for agent in agents]
    return subprocess.CompletedProcess(args, max(agent.returncode for agent in agents),
                                       "".join(out for out, _ in outputs), "".join(err for _, err in outputs))


def launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    """`clipkd ARGS` in this process, or under torchrun with more `processes`."""
    return clipkd(*args) if processes == 1 else torchrun_cli(processes, *args)


def kill_and_resume_matches_uninterrupted(config: Path, tmp_path: Path, kill_after_step: int, total_steps: int,
                                          command: tuple[str, ...] = ("train",),
                                          final: tuple[str, str] | None = None,
                                          stop: signal.Signals = signal.SIGKILL, processes: int = 1) -> None:
    """Train CONFIG uninterrupted; train it again, stop it once past `kill_after_step`, resume with
    `--resume latest` (`resume_latest`); assert the two runs end with identical weights. The config's output dir is
    the run's.

    `command`: the CLI command that trains (`train`, or `cls train`); `final`: (checkpoint file name, weights key)
    of the last weights, default (epoch_{epochs}.pt, state_dict). `stop`: SIGKILL (sent once latest.pt has passed the
    step) or a signal the trainer catches (sent once log.jsonl has; the run must save latest.pt and exit 128 + it).
    `processes` > 1: every run under torchrun, the signal sent to its whole process group (as a scheduler does).
    """
    import torch
    import yaml

    raw = yaml.safe_load(config.read_text())
    run_dir = Path(raw["train"]["output_dir"])
    reference = launch(processes, *command, str(config), f"train.output_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-2000:]
    latest = run_dir / "checkpoints" / "latest.pt"
    torchrun = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                          str(processes)]
    process = subprocess.Popen([sys.executable, *torchrun, "-m", "clipkd_dino.cli", *command, str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if stop == signal.SIGKILL and latest.exists() and \
                torch.load(latest, weights_only=True)["step"] >= kill_after_step:
            break
        if stop != signal.SIGKILL and log.exists() and len(log.read_text().splitlines()) >= kill_after_step:
            break
        time.sleep(0.05)
    os.killpg(process.pid, stop)
    if processes == 1:
        assert process.wait() == (-stop if stop == signal.SIGKILL else 128 + stop)
    else:  # torchrun reports its stopped workers with an exit code of its own
        assert process.wait(timeout=120) != 0
    killed_at = torch.load(latest, weights_only=True)
    assert 0 < killed_at["step"] < total_steps, "the run must be killed mid-way"

    resume_latest(config, command, killed_at["step"], total_steps, processes)
    name, key = final or (f"epoch_{raw['train']['epochs']}.pt", "state_dict")
    resumed_weights = torch.load(run_dir / "checkpoints" / name, weights_only=True)[key]
    expected = torch.load(tmp_path / "reference" / "checkpoints" / name, weights_only=True)[key]
    for tensor_name, tensor in expected.items():
        torch.testing.assert_close(resumed_weights[tensor_name], tensor, msg=tensor_name)


def resume_latest(config: Path, command: tuple[str, ...], saved_step: int, total_steps: int,
                  processes: int = 1) -> None:
    """`COMMAND CONFIG --resume latest` (`launch`ed) after a run of CONFIG stopped with `saved_step` steps in
    latest.pt; asserts that it says where it resumes and that its own log lines are those of the steps after the
    saved one (training is deterministic: a run that ignored `--resume` and started again from step 0 would also end
    with the weights of an uninterrupted run). Log steps increase across log.jsonl, apart from those the stopped run
    logged after its last save."""
    import yaml

    train = yaml.safe_load(config.read_text())["train"]
    log = Path(train["output_dir"]) / "log.jsonl"
    logged_before = len(log.read_text().splitlines())
    resumed = launch(processes, *command, str(config), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {saved_step} " in resumed.stderr
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    every = train["log_every_steps"]
    assert steps[logged_before:] == [s for s in range(saved_step + 1, total_steps + 1) if s == 1 or s % every == 0]
    kept = [s for s in steps[:logged_before] if s <= saved_step] + steps[logged_before:]
    assert kept == sorted(set(kept)), "log steps must increase, apart from those logged after the last save"


def label_toyworld(toyworld_dir: Path, out: Path, data: Path, **settings) -> Path:
    """`clipkd label` (in this process) of toyworld `data` with the shipped toy teacher, its 16 kinds as the pool
    and toyworld's templates; returns the output folder."""
    from clipkd_dino.toyworld.generate import KINDS
    from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset

    out.mkdir(parents=True, exist_ok=True)
    pool = out.parent / f"{out.name}_pool.json"
    pool.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": k, "count": 1} for k in KINDS]}))
    label_dataset(LabelSettings(teacher="toy-teacher", teacher_pretrained=str(REPO / "assets" / "toy_teacher.pt"),
                                concepts=str(pool), data=str(data), out=str(out), workers=0, device="cpu",
                                templates=str(toyworld_dir / "val" / "zeroshot" / "templates.json"),
                                **settings))
    return out
