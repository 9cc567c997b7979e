"""A resume continues only on the data stream it was saved on: a changed stream is refused in one line naming what
changed, unless `--new-stream` says to go on with it (and the run says so)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from clipkd_dino.config import load_config
from clipkd_dino.errors import ConfigError
from clipkd_dino.train.trainer import Trainer
from conftest import clipkd


@pytest.fixture(scope="module")
def saved_run(toyworld_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A 1-epoch run on two sources (shards 0-1 and shard 2 of toyworld, each with its sizes.json), its latest.pt
    saved after batch 2 of the epoch; returns (the config, latest.pt)."""
    root = tmp_path_factory.mktemp("stream")
    shards = sorted((toyworld_dir / "train" / "shards").glob("*.tar"))
    for folder, members in (("a", shards[:2]), ("b", shards[2:]), ("c", shards[:1])):
        (root / folder).mkdir()
        for shard in members:
            shutil.copy(shard, root / folder / shard.name)
        (root / folder / "sizes.json").write_text(json.dumps({shard.name: 32 for shard in members}))
    config = {"model": {"name": "toy-student"},
              "data": {"train": f"{root / 'a'}::{root / 'b'}", "workers": 0, "augment": False,
                       "shuffle_buffer": 10},
              "optim": {"warmup_steps": 2},
              "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "output_dir": str(root / "run"),
                        "log_every_steps": 100, "eval_every_epochs": 0, "checkpoint_every_steps": 2}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = Trainer(load_config(path))
    original = trainer.save_latest

    def save_mid_epoch_only() -> Path:  # keep the latest.pt of step 2 (mid-epoch)
        return original() if trainer.position.step <= 2 else trainer.latest_path

    trainer.save_latest = save_mid_epoch_only
    trainer.run()
    latest = root / "run" / "checkpoints" / "latest.pt"
    assert torch.load(latest, weights_only=True)["batch_in_epoch"] == 2
    return path, latest


def resumed(config: Path, latest: Path, tmp_path: Path, *overrides: str, new_stream: bool = False) -> Trainer:
    trainer = Trainer(load_config(config, [f"train.output_dir={tmp_path / 'resumed'}", *overrides]),
                      resume=str(latest), new_stream=new_stream)
    trainer.lock.release()
    return trainer


@pytest.mark.parametrize("overrides, changed", [
    (("train.batch_size=4",), "train.batch_size: 8 -> 4"),
    (("data.workers=2",), "data.workers: 1 -> 2"),
    (("train.seed=1",), "train.seed: 0 -> 1"),
    (("data.shuffle_buffer=20",), "data.shuffle_buffer: 10 -> 20"),
    (("optim.accum_steps=2",), "optim.accum_steps: 1 -> 2"),
    (("data.epochs=resampled", "data.num_samples=96"), "data.epochs: exact -> resampled"),
])
def test_a_changed_stream_is_refused_naming_what_changed(saved_run, tmp_path, overrides, changed):
    config, latest = saved_run
    with pytest.raises(ConfigError, match=f"--resume: .*{changed.replace('>', '.')}.*--new-stream"):
        resumed(config, latest, tmp_path, *overrides)


def test_other_shards_are_refused_and_reordered_sources_resume_exactly(saved_run, tmp_path):
    config, latest = saved_run
    first, second = yaml.safe_load(config.read_text())["data"]["train"].split("::")
    added = str(Path(second).parent / "c")  # a third source: one more shard
    with pytest.raises(ConfigError, match=r"data.train: 3 shards sha256:\w+ -> 4 shards"):
        resumed(config, latest, tmp_path, f"data.train={first}::{second}::{added}")
    with pytest.raises(ConfigError, match=r"data.train: 3 shards sha256:\w+ -> 2 shards"):
        resumed(config, latest, tmp_path, f"data.train={first}")
    again = resumed(config, latest, tmp_path, f"data.train={second}::{first}")  # the same shards, other order
    saved = torch.load(latest, weights_only=True)
    cursors = saved["data_cursors"][0]
    assert again.position.batch == 2 and again.cursors.keys() == cursors.keys()
    assert all(torch.equal(again.cursors[s]["buffer"], cursors[s]["buffer"]) for s in cursors)


def test_new_stream_goes_on_from_the_same_share_of_the_epoch_and_says_so(saved_run, tmp_path):
    config, latest = saved_run
    result = clipkd("train", str(config), f"train.output_dir={tmp_path / 'resumed'}", "train.batch_size=4",
                    "--resume", str(latest), "--new-stream")
    assert result.returncode == 0, result.stderr[-2000:]
    # 2 of the 12 batches of 8 were done; the new stream has 24 batches of 4: it goes on at batch 4
    assert "resuming at step 2 (epoch 1, batch 4) on a new data stream (train.batch_size: 8 -> 4" in result.stderr
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 2 + 20 and summary["data_epochs"] == "exact"
