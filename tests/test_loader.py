"""The one DataLoader factory's guards: batches in flight against /dev/shm, and what a training run does with it."""

from __future__ import annotations

import logging
import shutil

import pytest
import yaml

from clipkd_dino.config import load_config
from clipkd_dino.data.loader import check_shared_memory
from clipkd_dino.errors import ConfigError


def test_batches_in_flight_are_compared_with_free_shared_memory(tmp_path, monkeypatch, caplog):
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    batch = free // 100
    assert check_shared_memory(batch, workers=2, prefetch=2, what="data.prefetch", folder=str(tmp_path)) == 16 * batch
    with caplog.at_level(logging.WARNING):  # 8 x 2 x 2 x 4 x free / 100 > free / 2: a warning, no error
        check_shared_memory(batch, workers=8, prefetch=2, what="data.prefetch", folder=str(tmp_path))
    assert "lower data.prefetch" in caplog.text
    with pytest.raises(ConfigError, match=r"8 workers x 4 batches .* x 4 processes on this node.*lower data\.prefetch"):
        check_shared_memory(batch, workers=8, prefetch=4, what="data.prefetch", folder=str(tmp_path))
    assert check_shared_memory(free, workers=0, prefetch=4, what="data.prefetch", folder=str(tmp_path)) == 0


def test_training_refuses_a_prefetch_that_does_not_fit_in_dev_shm(tmp_path, toyworld_dir):
    from clipkd_dino.train.trainer import Trainer

    if not shutil.os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    prefetch = shutil.disk_usage("/dev/shm").free // (48 * 48 * 3 * 8 * 2) + 1  # > free / (a batch's pixels x 2)
    config = {"model": {"name": "toy-student"},
              "data": {"train": str(toyworld_dir / "train" / "shards"), "workers": 2, "prefetch": int(prefetch)},
              "train": {"batch_size": 8, "device": "cpu", "output_dir": str(tmp_path / "run")}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"MiB of batches in /dev/shm .* lower data\.prefetch or data\.workers"):
        Trainer(load_config(tmp_path / "config.yaml"))
    assert not (tmp_path / "run" / "checkpoints").exists()
