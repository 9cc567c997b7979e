"""Distillation: online and cached teachers agree, every named loss runs, MFD masks, training resumes exactly, a term
declared in one place trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, clipkd, kill_and_resume_matches_uninterrupted, label_toyworld

TEACHER = REPO / "assets" / "toy_teacher.pt"


@pytest.fixture(scope="module")
def label_dir(toyworld_dir, tmp_path_factory) -> Path:
    """The labelling pass over the toy train CSV: labels, class means and a 2-view cache."""
    return label_toyworld(toyworld_dir, tmp_path_factory.mktemp("distill_labels") / "labels",
                          toyworld_dir / "train" / "captions.csv", cache_views=2, batch_size=48)


def distill_config(tmp_path: Path, toyworld_dir: Path, label_dir: Path, cached: bool, **weights) -> Path:
    config = {
        "model": {"name": "toy-student"},
        "data": {"train": str(toyworld_dir / "train" / "captions.csv"), "workers": 0},
        "optim": {"warmup_steps": 2, "lr": 1e-3},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "output_dir": str(tmp_path / "run"),
                  "log_every_steps": 1, "eval_every_epochs": 0},
        "distill": {"teacher": "toy-teacher", "labels": str(label_dir),
                    **({"cache": str(label_dir)} if cached else {"teacher_pretrained": str(TEACHER)}),
                    **({"weights": weights} if weights else {})},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _distiller_and_batch(tmp_path, toyworld_dir, label_dir, **weights):
    from clipkd_dino.config import load_config
    from clipkd_dino.data.pairs import PairImages, TrainData
    from clipkd_dino.distill import build_objective
    from clipkd_dino.models import create_model, get_tokenizer

    torch.manual_seed(0)
    config = load_config(distill_config(tmp_path, toyworld_dir, label_dir, True, **weights))
    student = create_model("toy-student")
    distiller = build_objective(config, student, torch.device("cpu"))
    images = PairImages(None, distiller.views, distiller.num_views)
    data = TrainData(config.data, images, get_tokenizer("toy-student"), batch_size=24, seed=1,
                     targets=distiller.batch_targets)
    return config, distiller, next(iter(data.epoch_batches(0)))


def test_online_and_cached_teacher_give_the_same_losses_on_the_same_views(tmp_path, toyworld_dir, label_dir):
    from clipkd_dino.distill.teachers import OnlineTeacher

    _, distiller, batch = _distiller_and_batch(tmp_path, toyworld_dir, label_dir, mfd=0.0)
    assert set(batch["view"].tolist()) <= {0, 1} and len(set(batch["view"].tolist())) == 2
    distiller.eval()  # the dino projector's dropout off: both passes see the same student
    with torch.no_grad():
        cached = distiller(batch)
        t_cached = distiller.teacher.features(batch)
        distiller.teacher = OnlineTeacher("toy-teacher", str(TEACHER), "fp32", torch.device("cpu"), distiller.model)
        online = distiller(batch)
        t_online = distiller.teacher.features(batch)
    torch.testing.assert_close(t_cached[0], t_online[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(t_cached[1], t_online[1], rtol=2e-3, atol=2e-3)
    assert set(cached) == {"loss_task", "loss_crd", "loss_icl", "loss_fd", "loss_dino"}
    for name in cached:
        torch.testing.assert_close(cached[name], online[name], rtol=5e-3, atol=1e-4, msg=name)


def test_every_loss_runs_with_differing_dims_and_mfd_really_masks(tmp_path, toyworld_dir, label_dir):
    _, distiller, batch = _distiller_and_batch(tmp_path, toyworld_dir, label_dir, fd=1.0, mfd=1.0, gd=1.0, afd=1.0,
                                               dino_text=1.0)
    tokens_seen = []
    hook = distiller.model.visual.transformer.register_forward_pre_hook(
        lambda module, args: tokens_seen.append(args[0].shape[1]))
    losses = distiller(batch)
    hook.remove()
    assert set(losses) == {"loss_task", "loss_crd", "loss_icl", "loss_fd", "loss_mfd", "loss_gd", "loss_afd",
                           "loss_dino", "loss_dino_text"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert tokens_seen == [1 + 36, 1 + 9]  # class token + 6x6 patches, then a quarter of the patches (MFD)
    assert losses["loss_mfd"] != losses["loss_fd"]  # the masked forward is used, not discarded
    sum(losses.values()).backward()
    for name in ("project_image.weight", "icl_log_scale", "fuse_image.weight", "dino_projector.2.weight",
                 "dino_text_projector.2.weight"):
        grad = dict(distiller.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not any(name.startswith("teacher") for name, _ in distiller.named_parameters())


def test_fd_weight_scales_with_the_embedding_dim(tmp_path, toyworld_dir, label_dir):
    _, distiller, _ = _distiller_and_batch(tmp_path, toyworld_dir, label_dir)
    assert distiller.weights["fd"] == pytest.approx(2000 * 96 / 512)


def test_cached_distillation_trains_logs_each_loss_and_resumes_to_the_same_weights(tmp_path, toyworld_dir,
                                                                                      label_dir):
    config = distill_config(tmp_path, toyworld_dir, label_dir, True)
    config.write_text(config.read_text().replace("epochs: 1", "epochs: 2").replace("batch_size: 16", "batch_size: 32")
                      .replace("log_every_steps: 1", "log_every_steps: 1\n  checkpoint_every_steps: 2"))
    kill_and_resume_matches_uninterrupted(config, tmp_path, kill_after_step=4, total_steps=30)  # 480 rows / 32 x 2
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss_task", "loss_crd", "loss_icl", "loss_fd", "loss_dino"} <= set(record)
    latest = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert {"project_image.weight", "icl_log_scale", "dino_projector.2.weight"} <= set(latest["objective"])
    student = torch.load(tmp_path / "run" / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    assert not any(k.startswith(("project", "dino", "icl")) for k in student)


@pytest.mark.slow
def test_killed_webdataset_cached_distillation_resumes_to_the_same_weights(tmp_path, toyworld_dir):
    """From the cache, on webdataset shards with two DataLoader workers: each worker's stream is a function of
    (seed, rank, epoch, stream) and is restored from its cursor at any batch; the cache rows and labels come from
    the workers; the dino projector's dropout continues as if never stopped."""
    shards = toyworld_dir / "train" / "shards"
    labels = label_toyworld(toyworld_dir, tmp_path / "labels", shards, cache_views=2)
    config = distill_config(tmp_path, toyworld_dir, labels, True)
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {"train": str(shards), "workers": 2, "augment": True, "num_samples": 320, "shuffle_buffer": 50}
    raw["train"] |= {"epochs": 2, "checkpoint_every_steps": 2}
    config.write_text(yaml.safe_dump(raw))
    kill_and_resume_matches_uninterrupted(config, tmp_path, kill_after_step=6, total_steps=40)
    assert "loss_dino" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])


def test_online_distillation_runs(tmp_path, toyworld_dir, label_dir):
    config = distill_config(tmp_path, toyworld_dir, label_dir, False)
    result = clipkd("train", str(config), "distill.teacher_precision=bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert record["loss_dino"] > 0 and record["loss_crd"] >= 0


@pytest.mark.parametrize("override, message", [
    ("distill.cache=/nonexistent", "config key 'distill.cache': no teacher cache in /nonexistent"),
    ("distill.labels=/nonexistent", "labels/label.npy not found in /nonexistent"),
    ("distill.weights.dino=-1", "config key 'distill.weights.dino' must be >= 0"),
    ("distill.dino_reduction=batch", "config key 'distill.dino_reduction' must be one of"),
    ("distill.weights.fdd=1", "unknown config key 'distill.weights.fdd'"),
])
def test_distill_config_errors_exit_2_with_one_line(tmp_path, toyworld_dir, label_dir, override, message):
    result = clipkd("train", str(distill_config(tmp_path, toyworld_dir, label_dir, True)), override)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_accumulated_micro_batches_give_the_whole_batch_contrastive_losses_and_gradients():
    """k micro-batches of B through `forward(batch, accumulated, index)` (each pass: the whole contrastive loss,
    only its own embeddings with a gradient) give the losses and gradients of one batch of kB, fp64, for task +
    CRD + ICL + GD + AFD (the teacher's embeddings come with the batch, as the cache's do)."""
    from clipkd_dino.config import DistillConfig
    from clipkd_dino.distill.distiller import CLIPDistiller
    from clipkd_dino.models import create_model, get_tokenizer

    torch.manual_seed(0)
    student = create_model("toy-student").double()
    weights = {"task": 1.0, "crd": 1.0, "icl": 1.0, "gd": 1.0, "afd": 1.0}
    distiller = CLIPDistiller(student, BatchTeacher(), DistillConfig(weights=weights), 64).double()
    tokens = get_tokenizer("toy-student")([f"a {c} star" for c in ("red", "blue", "green", "pink")] * 3)
    whole = {"images": torch.rand(12, 3, 48, 48, dtype=torch.float64), "texts": tokens,
             "teacher_image": torch.randn(12, 96, dtype=torch.float64),
             "teacher_text": torch.randn(12, 96, dtype=torch.float64)}
    named = distiller(whole)
    sum(named.values()).backward()
    expected = {name: p.grad.clone() for name, p in distiller.named_parameters() if p.grad is not None}
    distiller.zero_grad()
    micro = [{k: v[i:i + 4] for k, v in whole.items()} for i in range(0, 12, 4)]
    with torch.no_grad():
        accumulated = [distiller.embed(batch) for batch in micro]
    for index, batch in enumerate(micro):
        parts = distiller(batch, accumulated, index)
        for name in named:
            torch.testing.assert_close(parts[name], named[name], rtol=1e-6, atol=1e-9)
        sum(parts.values()).backward()
    assert set(expected) == {name for name, p in distiller.named_parameters() if p.grad is not None}
    for name, grad in expected.items():
        torch.testing.assert_close(dict(distiller.named_parameters())[name].grad, grad, rtol=1e-6, atol=1e-9)


class BatchTeacher:
    """The cache's role: the teacher's embeddings arrive in the batch."""

    views, num_views, logit_scale = None, 0, 50.0

    def __init__(self, dim: int = 96) -> None:
        self.dim = dim

    def features(self, batch):
        return batch["teacher_image"], batch["teacher_text"]


@pytest.mark.parametrize("weights, batch_wide, every_parameter, embedded, extras", [
    ({"task": 1, "crd": 1, "icl": 1, "gd": 1, "afd": 1}, {"task", "crd", "icl", "gd", "afd"}, True,
     {"n_image", "n_text", "p_image", "p_text", "t_image", "t_text"},
     {"project_image", "project_text", "icl_log_scale", "fuse_image", "fuse_text"}),
    ({"fd": None, "mfd": 1}, set(), False, {"p_image", "p_text", "masked", "t_image", "t_text"},
     {"project_image", "project_text"}),
    ({"dino": 1, "task": 1}, {"task"}, True, {"n_image", "n_text", "s_image", "t_image", "labels"},
     {"dino_projector"}),
    ({"dino": 1}, set(), False, {"s_image", "t_image", "labels"}, {"dino_projector"}),
])
def test_what_follows_from_the_term_declarations(weights, batch_wide, every_parameter, embedded, extras):
    """Batch-wide losses, DDP's every-parameter flag, the embeddings computed and the parts built, per recipe."""
    from clipkd_dino.config import DistillConfig
    from clipkd_dino.distill.distiller import CLIPDistiller
    from clipkd_dino.models import create_model

    distiller = CLIPDistiller(create_model("toy-student"), BatchTeacher(), DistillConfig(weights=weights), 64,
                              torch.randn(5, 96))
    assert distiller.batch_wide == {f"loss_{name}" for name in batch_wide}
    assert distiller.uses_every_parameter is every_parameter
    assert set(distiller.embedded) == embedded
    assert {name.split(".")[0] for name in distiller.state_dict() if not name.startswith("model.")} == extras


@pytest.fixture
def cosine_term():
    """A loss term declared the way a user adds one, in one place: 1 - cos between the student's features, through
    a projector of its own, and the teacher's. Yields the initial weights of the projectors it builds."""
    from clipkd_dino.distill.terms import TERMS, Part, Term, register_term

    initial = []

    def projector(setting) -> torch.nn.Module:
        module = torch.nn.Linear(setting.student_dim, setting.teacher_dim)
        initial.append(module.weight.detach().clone())
        return module

    def cosine_distance(s_image, s_text, t_image, t_text, project):
        """[B, D_s], [B, D_s], [B, D_t], [B, D_t] -> 2 - mean cos(project(S_v), T_v) - mean cos(project(S_t), T_t)."""
        return sum(1 - F.cosine_similarity(project(s), t.detach(), dim=-1).mean()
                   for s, t in ((s_image, t_image), (s_text, t_text)))

    register_term(Term("cos_fd", ("s_image", "s_text", "t_image", "t_text", "cos_projector"), cosine_distance,
                       parts=(Part("cos_projector", projector),)))
    yield initial
    del TERMS["cos_fd"]


def test_a_term_declared_in_one_place_trains_and_is_logged(tmp_path, toyworld_dir, label_dir, cosine_term):
    from clipkd_dino.models import create_model

    config = distill_config(tmp_path, toyworld_dir, label_dir, True, task=0, crd=0, icl=0, fd=0, dino=0, cos_fd=2.0)
    result = clipkd("train", str(config), "train.batch_size=48")  # 2 steps
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert record["loss_cos_fd"] > 0 and not {"loss_task", "loss_fd", "loss_dino"} & set(record)
    objective = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)["objective"]
    (initial,) = cosine_term
    assert not torch.equal(objective["cos_projector.weight"], initial)  # its own part trains
    assert objective["model.logit_scale"] == create_model("toy-student").logit_scale  # no term reads it
