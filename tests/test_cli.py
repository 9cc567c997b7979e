"""The `clipkd` command: subcommands and their help, and an in-process training run with every option on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from clipkd_dino.config import load_config
from clipkd_dino.report import plot_eval_curves
from clipkd_dino.train.trainer import train
from conftest import REPO

SUBCOMMANDS = ["toyworld", "train", "eval", "concepts", "label", "cls", "export", "demo"]


def test_help_lists_every_subcommand():
    clipkd = REPO / ".venv" / "bin" / "clipkd"
    if not clipkd.exists():
        pytest.skip("the clipkd entry point is installed by scripts/setup.sh into .venv")
    result = subprocess.run([str(clipkd), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout
        sub = subprocess.run([str(clipkd), name, "--help"], capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0 and "usage: clipkd " + name in sub.stdout


def test_accumulation_clipping_bf16_and_logs(tmp_path, toyworld_dir):
    overrides = [
        f"data.train={toyworld_dir / 'train' / 'captions.csv'}", "data.workers=0",
        f"data.val_retrieval={toyworld_dir / 'val' / 'retrieval.jsonl'}",
        f"data.val_zeroshot={toyworld_dir / 'val' / 'zeroshot'}",
        "model.name=toy-student", "optim.accum_steps=2", "optim.grad_clip=0.5", "optim.warmup_steps=2",
        "train.batch_size=16", "train.epochs=1", "train.precision=bf16", "train.device=cpu",
        f"train.output_dir={tmp_path / 'run'}", "train.log_every_steps=5",
    ]
    summary = train(load_config(None, overrides))
    run = Path(tmp_path / "run")
    assert summary["steps"] == 15 and summary["global_batch"] == 32  # 480 captions / 16 = 30 micro-batches
    assert summary["contrastive_batch"] == 32  # the contrastive terms see both micro-batches
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 5, 10, 15]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    evaluation = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert evaluation["retrieval"]["num_images"] == 24 and 0 <= evaluation["zeroshot"]["top1"] <= 100
    assert summary["metrics"] == {k: v for k, v in evaluation.items() if k not in ("epoch", "step")}
    assert (run / "checkpoints" / "epoch_1.pt").is_file() and (run / "config.yaml").is_file()
    plot = plot_eval_curves({"student": run / "metrics.jsonl"}, tmp_path / "curves.png")
    assert plot.read_bytes().startswith(b"\x89PNG")
