"""Shared fixtures: a small toyworld data set (generated once per session) and helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def toyworld_dir(tmp_path_factory) -> Path:
    """A 96-image train / 24-image val toyworld at 48 px (about a second to generate)."""
    from clipkd_dino.data.toyworld import generate

    out = tmp_path_factory.mktemp("toyworld")
    generate(out, n_train=96, n_val=24, image_size=48, seed=0, workers=1, shard_size=32)
    return out


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python -m clipkd_dino.cli ARGS` in a subprocess, output captured as text."""
    return subprocess.run([sys.executable, "-m", "clipkd_dino.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", REPO), **kwargs)


def torchrun_cli(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node NPROC -m clipkd_dino.cli ARGS` on the CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "clipkd_dino.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
