"""The CUDA path (AMP bf16/fp16, pinned memory, evaluation on the GPU). Skipped where no GPU is present; run by
benchmarks/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import json

import pytest
import torch

from clipkd_dino.config import load_config
from clipkd_dino.train.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_and_evaluation_on_cuda(tmp_path, toyworld_dir, precision):
    summary = train(load_config(None, [
        f"data.train={toyworld_dir / 'train' / 'shards'}", "data.workers=1",
        f"data.val_retrieval={toyworld_dir / 'val' / 'retrieval.jsonl'}",
        f"data.val_zeroshot={toyworld_dir / 'val' / 'zeroshot'}",
        "model.name=toy-student", "optim.warmup_steps=2", "optim.grad_clip=1.0",
        "train.batch_size=16", "train.epochs=2", f"train.precision={precision}", "train.device=cuda",
        f"train.output_dir={tmp_path / 'run'}", "train.log_every_steps=1",
    ]))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 12 and all(loss == loss for loss in losses), "no NaN losses"
    assert losses[-1] < losses[0]
    assert 0 <= summary["metrics"]["zeroshot"]["top1"] <= 100
