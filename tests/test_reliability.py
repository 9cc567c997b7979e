"""Training survives what long jobs meet: SIGTERM / SIGINT, non-finite losses, a full disk, a second run in the same
folder, and too much bad data (`data.max_bad_fraction`). CLIP and classification trainers alike."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipkd_dino.config import load_config
from clipkd_dino.errors import UserError
from clipkd_dino.engine.guard import OutputLock
from clipkd_dino.train.trainer import Trainer
from conftest import REPO, clipkd, kill_and_resume_matches_uninterrupted, resume_latest
from test_train import read_log, write_config


def _wait_for_steps(log: Path, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"{log} did not reach {steps} steps")


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM])  # SIGINT: the classifier test below
def test_a_stop_signal_saves_latest_and_the_run_resumes(tmp_path, toyworld_dir, signal_number):
    """The signal goes to the whole process group, as a Ctrl-C or a scheduler sends it: the DataLoader workers
    ignore it and the main process saves and stops."""
    config = write_config(tmp_path, toyworld_dir, train={"epochs": 2}, data={"workers": 2})
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "clipkd_dino.cli", "train", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_steps(run_dir / "log.jsonl", 3, process)
    os.killpg(process.pid, signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, stderr[-2000:]
    message = stderr.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(signal_number).name}" in message and "--resume latest" in message
    saved = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert 3 <= saved["step"] < 60 and saved["batch_in_epoch"] == saved["step"] % 30
    resume_latest(config, ("train",), saved["step"], 60)


def _classifier_config(tmp_path: Path, **train) -> Path:
    """A resnet8 on 640 digits (20 steps of 32 in one process), alone: no teacher."""
    import yaml

    config = tmp_path / "cls.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "cls" / "digits" / "teacher.yaml"), "model": {"student": "resnet8"},
        "data": {"train_limit": 640}, "optim": {"milestones": [1]},
        "train": {"epochs": 1, "batch_size": 32, "log_every_steps": 1, "output_dir": str(tmp_path / "run"),
                  **train}}))
    return config


@pytest.mark.slow
def test_sigterm_mid_epoch_under_torchrun_then_resume_gives_the_uninterrupted_classifier(tmp_path):
    """2 processes: every rank's random stream (the augmentations) and position come back from latest.pt."""
    config = _classifier_config(tmp_path, epochs=2)
    kill_and_resume_matches_uninterrupted(config, tmp_path, kill_after_step=13, total_steps=20,
                                          command=("cls", "train"), final=("last.pt", "model"),
                                          stop=signal.SIGTERM, processes=2)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["batch_in_epoch"] == 0 and len(saved["rng"]) == 2


def test_classifier_skips_a_non_finite_step_and_accumulates(tmp_path, capsys):
    """The classification mode runs the engine's step: 4 micro-batches of 32 in 2 steps (optim.accum_steps), the
    first step's NaN loss skipped, the weights finite."""
    from clipkd_dino.classify.config import load_cls_config
    from clipkd_dino.classify.trainer import ClsTrainer

    config = load_cls_config(str(_classifier_config(tmp_path)), ["data.train_limit=128", "optim.accum_steps=2"])
    trainer = ClsTrainer(config)
    forward, calls = trainer.wrapped.forward, [0]

    def poisoned(images, targets, epoch):
        logits, named = forward(images, targets, epoch)
        calls[0] += 1
        return logits, {k: v * float("nan") for k, v in named.items()} if calls[0] == 1 else named

    trainer.wrapped.forward = poisoned
    summary = trainer.run()
    assert calls[0] == 4 and summary["steps"] == 2 and summary["nonfinite_steps"] == 1
    assert "non-finite loss_ce: step skipped" in capsys.readouterr().err
    assert [record["step"] for record in read_log(tmp_path / "run")] == [2]
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())


def _nan_on_calls(trainer: Trainer, calls: set[int]) -> list[int]:
    """Make the objective's loss_task NaN on the given (0-based) forward calls; returns the call counter."""
    counter, forward = [0], trainer.wrapped.forward

    def poisoned(batch):
        named = forward(batch)
        if counter[0] in calls:
            named["loss_task"] = named["loss_task"] * float("nan")
        counter[0] += 1
        return named

    trainer.wrapped.forward = poisoned
    return counter


def test_non_finite_steps_are_skipped_and_never_reach_the_weights(tmp_path, toyworld_dir, capsys):
    trainer = Trainer(load_config(write_config(tmp_path, toyworld_dir, train={"checkpoint_every_steps": 1})))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _nan_on_calls(trainer, {0, 5, 6})
    summary = trainer.run()
    assert summary["nonfinite_steps"] == 3 and summary["steps"] == 30
    assert "non-finite loss_task: step skipped" in capsys.readouterr().err
    logged = [record["step"] for record in read_log(tmp_path / "run")]
    assert 1 not in logged and 6 not in logged and 7 not in logged and 8 in logged
    final = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    assert any(not torch.equal(final[k], before[k]) for k in before)


def test_a_streak_of_non_finite_steps_stops_the_run(tmp_path, toyworld_dir):
    trainer = Trainer(load_config(write_config(tmp_path, toyworld_dir, train={"max_nonfinite_steps": 3})))
    _nan_on_calls(trainer, set(range(4, 30)))
    with pytest.raises(UserError, match="3 steps in a row had a non-finite loss"):
        trainer.run()


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, toyworld_dir, monkeypatch):
    import clipkd_dino.engine.checkpoint as checkpoint

    trainer = Trainer(load_config(write_config(tmp_path, toyworld_dir, train={"checkpoint_every_steps": 5})))
    real_save, calls = torch.save, [0]

    def disk_fills_up(payload, stream):
        calls[0] += 1
        if calls[0] == 1:
            return real_save(payload, stream)
        stream.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_up)
    with pytest.raises(UserError, match="latest.pt: No space left on device; the file there before, if any, is intact"):
        trainer.run()
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert torch.load(latest, weights_only=True)["step"] == 5
    assert [p.name for p in latest.parent.iterdir()] == ["latest.pt"]  # no temporary file left behind


def test_a_second_run_in_the_same_folder_stops_with_a_clear_error(tmp_path, toyworld_dir):
    config = write_config(tmp_path, toyworld_dir)
    lock = OutputLock(tmp_path / "run")
    try:
        result = clipkd("train", str(config))
        assert result.returncode == 2
        assert "is in use by another run" in result.stderr and str(tmp_path / "run") in result.stderr
        cls = clipkd("cls", "train", str(REPO / "configs" / "cls" / "digits" / "teacher.yaml"),
                      f"train.output_dir={tmp_path / 'run'}")
        assert cls.returncode == 2 and "is in use by another run" in cls.stderr
        label = clipkd("label", "--teacher", "toy-teacher", "--teacher-pretrained",
                        str(REPO / "assets" / "toy_teacher.pt"), "--concepts",
                        str(REPO / "concepts" / "coco_val2017.json"), "--data", str(toyworld_dir / "train" / "shards"),
                        "--out", str(tmp_path / "run"))
        assert label.returncode == 2 and "is in use by another run" in label.stderr
    finally:
        lock.release()
    OutputLock(tmp_path / "run").release()  # free again once its holder let go


def test_max_bad_fraction_stops_training_on_too_much_bad_data(tmp_path, toyworld_dir):
    rows = (toyworld_dir / "train" / "captions.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    images = toyworld_dir / "train"
    broken = [f"{images / 'images' / 'missing'}-{i}.png\t{row.split(chr(9))[1]}" if i % 2 else
              f"{images / row.split(chr(9))[0]}\t{row.split(chr(9))[1]}" for i, row in enumerate(body)]
    csv = tmp_path / "half_missing.csv"
    csv.write_text("\n".join([header, *broken]) + "\n")
    config = write_config(tmp_path, toyworld_dir, data={"train": str(csv)})
    stopped = clipkd("train", str(config), "data.max_bad_fraction=0.3")
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("clipkd train: error: ")]
    assert stopped.returncode == 2 and len(errors) == 1, stopped.stderr[-2000:]
    assert "data.train:" in errors[0] and "max_bad_fraction 0.3" in errors[0] and "missing_image" in errors[0]
    tolerated = clipkd("train", str(config), "data.max_bad_fraction=0.6")
    assert tolerated.returncode == 0, tolerated.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == {"missing_image": 240} and summary["seen_samples"] == 480
    bad_value = clipkd("train", str(config), "data.max_bad_fraction=1.5")
    assert bad_value.returncode == 2 and "data.max_bad_fraction" in bad_value.stderr


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_by_every_loader(tmp_path, toyworld_dir):
    """A pickle that runs a command when unpickled, handed to each command that reads weights: every one refuses it
    in one line (weights_only loading) and the command never runs."""
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "model": {}, "payload": _RunsCodeWhenUnpickled(marker)}, evil)
    config = write_config(tmp_path, toyworld_dir)
    attempts = {
        "train --resume": clipkd("train", str(config), "--resume", str(evil)),
        "eval": clipkd("eval", "--model", "toy-student", "--pretrained", str(evil), "--retrieval",
                       str(toyworld_dir / "val" / "retrieval.jsonl"), "--out", str(tmp_path / "m.json")),
        "eval (our checkpoint)": clipkd("eval", "--pretrained", str(evil), "--retrieval",
                                        str(toyworld_dir / "val" / "retrieval.jsonl"),
                                        "--out", str(tmp_path / "m.json")),
        "label": clipkd("label", "--teacher", "toy-teacher", "--teacher-pretrained", str(evil), "--concepts",
                        str(REPO / "concepts" / "coco_val2017.json"), "--data", str(toyworld_dir / "train" / "shards"),
                        "--out", str(tmp_path / "labels"), "--device", "cpu"),
        "cls train": clipkd("cls", "train", str(REPO / "configs" / "cls" / "digits" / "student.yaml"),
                            f"model.teacher_pretrained={evil}", f"train.output_dir={tmp_path / 'cls'}",
                            "train.device=cpu"),
        "export": clipkd("export", str(evil), "--out", str(tmp_path / "export")),
    }
    for command, result in attempts.items():
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert len(result.stderr.strip().splitlines()) == 1 and str(evil) in result.stderr, (command, result.stderr)
        assert "pickled objects other than weights" in result.stderr, (command, result.stderr)
    assert not marker.exists()


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_and_reported(tmp_path, toyworld_dir, capsys):
    trainer = Trainer(load_config(write_config(tmp_path, toyworld_dir)))
    calls = [0]

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return grad * float("inf") if calls[0] in (2, 3) else grad

    trainer.model.logit_scale.register_hook(poison)
    summary = trainer.run()
    assert summary["nonfinite_steps"] == 2
    assert "non-finite gradient (norm " in capsys.readouterr().err
    final = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    records = read_log(tmp_path / "run")
    steps = [record["step"] for record in records]
    assert 2 not in steps and 3 not in steps and 4 in steps and all("grad_norm" in r for r in records)
