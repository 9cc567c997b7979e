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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_classification_kdpp_on_cuda(tmp_path, precision):
    from clipkd_dino.classify.centers import compute_centers
    from clipkd_dino.classify.config import load_cls_config
    from clipkd_dino.classify.trainer import train_classifier

    digits = "configs/cls/digits"
    teacher = train_classifier(load_cls_config(f"{digits}/teacher.yaml", [
        "model.student=wrn_16_2", "train.epochs=1", "train.device=cuda", f"train.precision={precision}",
        f"train.output_dir={tmp_path / 'teacher'}"]))
    student = ["model.teacher=wrn_16_2", f"model.teacher_pretrained={teacher['checkpoint']}", "train.device=cuda",
               f"train.precision={precision}", f"distill.class_means={tmp_path / 'centers'}",
               f"centers.out={tmp_path / 'centers'}", "train.epochs=2", "distill.dino_weight=1"]
    compute_centers(load_cls_config(f"{digits}/student.yaml", student))
    summary = train_classifier(load_cls_config(f"{digits}/student.yaml", student + [
        f"train.output_dir={tmp_path / 'student'}", "train.log_every_steps=1"]))
    losses = [json.loads(line)["loss_dino"] for line in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    assert all(loss == loss for loss in losses) and 0 <= summary["best_top1"] <= 100


def test_chunked_search_on_cuda_equals_the_cpu():
    from clipkd_dino.eval.search import top_k

    generator = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(300, 64, generator=generator), torch.randn(5000, 64, generator=generator)
    cpu_scores, cpu_ids = top_k(queries, gallery, 10, backend="torch", query_chunk=128, gallery_chunk=1000)
    gpu_scores, gpu_ids = top_k(queries.cuda(), gallery.cuda(), 10, backend="torch", query_chunk=128,
                                gallery_chunk=1000)
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, atol=1e-4, rtol=1e-4)
    assert (gpu_ids.cpu() == cpu_ids).float().mean() > 0.99
