"""Loader workers of the labelling pass: a batch is a few shared-memory tensors, and a failing or stuck worker ends
the command with its error instead of a hang."""

from __future__ import annotations

import gc
import json
import resource
import time
from pathlib import Path

import numpy
import pytest
import torch
from torch.utils.data import Dataset

from clipkd_dino.data.loader import batches, data_loader
from conftest import REPO, clipkd, run_cli

TEACHER = REPO / "assets" / "toy_teacher.pt"
OPEN_FILES = 1024  # the common soft limit; also the hard limit in the test, so nothing can raise it


@pytest.fixture(scope="module")
def toyworld_600(tmp_path_factory) -> Path:
    """600 toyworld images at 48 px in 4 shards (2 per loader worker), and a pool of the 16 kinds."""
    from clipkd_dino.toyworld.generate import generate

    out = tmp_path_factory.mktemp("toyworld_600")
    generate(out, n_train=600, n_val=8, image_size=48, seed=1, workers=1, shard_size=150)
    _pool(out / "pool.json")
    return out


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["label", "--teacher", "toy-teacher", "--teacher-pretrained", str(TEACHER), "--concepts",
            str(data / "pool.json"), "--data", str(data / "train" / "shards"), "--out", str(out), "--templates",
            str(data / "val" / "zeroshot" / "templates.json"), "--device", "cpu", "--cache-views", "2",
            "--batch-size", "256", *extra]


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


def test_two_workers_with_two_views_label_under_1024_open_files(toyworld_600, tmp_path):
    """256 samples x (pixels + 2 views) were 768 descriptors a batch, 4 batches in flight: past the limit, and the
    run hung. Stacked, a batch is 2 tensors; the labels equal those of a run without workers."""
    reference = clipkd(*_args(toyworld_600, tmp_path / "reference", "--workers", "0"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    result = run_cli(*_args(toyworld_600, tmp_path / "workers", "--workers", "2", "--worker-timeout", "60"),
                     timeout=180, preexec_fn=_limit_open_files)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("label", "concept"):
        assert (numpy.load(tmp_path / "workers" / "labels" / f"{name}.npy").tolist()
                == numpy.load(tmp_path / "reference" / "labels" / f"{name}.npy").tolist()), name
    for name in ("identities.txt", "truth.txt"):
        assert ((tmp_path / "workers" / "samples" / name).read_bytes()
                == (tmp_path / "reference" / "samples" / name).read_bytes()), name
    images = [numpy.load(tmp_path / run / "cache" / "images.npy") for run in ("reference", "workers")]
    assert images[0].shape == (600, 2, images[0].shape[2])
    numpy.testing.assert_allclose(images[1].astype(numpy.float32), images[0].astype(numpy.float32), atol=2e-3)


class _Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        raise ValueError(f"sample {index} is broken")


def test_a_worker_that_raises_ends_the_command_with_its_error():
    with pytest.raises(ValueError, match="sample 0 is broken"):
        list(batches(data_loader(_Broken(), workers=1, timeout=60), "--worker-timeout"))
    gc.collect()


def _label_with_one_worker(toyworld_dir: Path, out: Path, *extra: str):
    args = ["label", "--teacher", "toy-teacher", "--teacher-pretrained", str(TEACHER), "--concepts",
            str(_pool(out.parent / "pool.json")), "--data", str(toyworld_dir / "train" / "shards"), "--out", str(out),
            "--templates", str(toyworld_dir / "val" / "zeroshot" / "templates.json"), "--device", "cpu",
            "--workers", "1", "--batch-size", "8", *extra]
    return clipkd(*args)


def _pool(path: Path) -> Path:
    from clipkd_dino.toyworld.generate import KINDS

    path.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": k, "count": 1} for k in KINDS]}))
    return path


def test_label_with_a_stuck_worker_stops_with_an_error_naming_the_flag(toyworld_dir, tmp_path, monkeypatch):
    import clipkd_dino.teacher.label_pass as label_pass

    monkeypatch.setattr(label_pass, "read_sample", lambda *args: time.sleep(60))  # the worker is forked with it
    started = time.monotonic()
    result = _label_with_one_worker(toyworld_dir, tmp_path / "out", "--worker-timeout", "2")
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "no batch from the data loader's workers in 2 s" in errors[0] and "raise --worker-timeout" in errors[0]
    assert time.monotonic() - started < 50


def test_label_with_a_failing_worker_ends_with_the_worker_error(toyworld_dir, tmp_path, monkeypatch):
    import clipkd_dino.teacher.label_pass as label_pass

    def fails(*args):
        raise OSError("the disk went away")

    monkeypatch.setattr(label_pass, "read_sample", fails)
    with pytest.raises(OSError, match="the disk went away"):
        _label_with_one_worker(toyworld_dir, tmp_path / "out", "--worker-timeout", "60")
    gc.collect()
