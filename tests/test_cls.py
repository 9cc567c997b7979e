"""The classification mode: configs per published row, data sets, class means, the trainer, resume, the demo."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from clipkd_dino.classify.config import check_cls_config, load_cls_config
from clipkd_dino.classify.distillers import DISTILLERS
from clipkd_dino.classify.data import build_data
from clipkd_dino.errors import ConfigError, UserError
from conftest import REPO, clipkd, kill_and_resume_matches_uninterrupted, torchrun_cli

PUBLISHED = sorted((REPO / "configs" / "cls").glob("*/*.yaml"))
ROWS = [p for p in PUBLISHED if p.parent.name in ("cifar100", "imagenet")]


# ------------------------------------------------------------------------------------------------ configs
def test_a_config_per_published_row():
    names = {p.relative_to(REPO / "configs" / "cls").as_posix() for p in ROWS}
    pairs = {"cifar100": ("res56_res20", "wrn40_2_wrn40_1", "res32x4_res8x4", "res50_mbv2", "res32x4_shv1",
                          "res32x4_shv2"),
             "imagenet": ("res34_res18", "res50_mv1")}
    methods = ("kd", "kdpp", "dkd", "dkdpp", "reviewkd", "reviewkdpp")
    assert names == {f"{d}/{p}_{m}.yaml" for d, ps in pairs.items() for p in ps for m in methods}


@pytest.mark.parametrize("path", ROWS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_published_row_parses_and_names_its_target(path):
    from clipkd_dino.models.cnn import create_classifier

    config = load_cls_config(path)
    method = path.stem.rsplit("_", 1)[1]
    assert config.distill.method == method.removesuffix("pp") and config.distill.method in DISTILLERS
    assert (config.distill.dino_weight > 0) == method.endswith("pp")
    if method.endswith("pp"):
        assert config.distill.class_means == config.centers.out
    assert config.published.source
    if path.parent.name == "cifar100":
        assert config.published.top1 is not None and 60 < config.published.top1 < 80
        assert config.train.epochs == 240 and config.optim.milestones == [150, 180, 210]
        assert config.distill.temperature == 4.0
        for name in (config.model.student, config.model.teacher):
            assert create_classifier(name, 100).feature_dim > 0
    else:
        import timm
        import torchvision

        assert config.train.epochs == 100 and config.distill.temperature == 1.0
        for name in (config.model.student, config.model.teacher):
            library, _, architecture = name.partition(":")
            known = torchvision.models.list_models() if library == "tv" else timm.list_models()
            assert architecture in known, name


@pytest.mark.parametrize("path", [p for p in ROWS if p.parent.name == "cifar100"], ids=lambda p: p.stem)
def test_published_cifar_row_runs_a_training_step(path):
    """Every CIFAR row's distiller builds from its config and back-propagates (random weights, 4 images)."""
    from clipkd_dino.classify.distillers import build_distiller
    from clipkd_dino.models.cnn import create_classifier

    config = load_cls_config(path)
    torch.manual_seed(0)
    teacher = create_classifier(config.model.teacher, 100)
    means = torch.randn(100, teacher.feature_dim) if config.distill.dino_weight else None
    distiller = build_distiller(config.distill, create_classifier(config.model.student, 100), teacher, means)
    distiller.train()
    logits, losses = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), epoch=30.0)
    assert logits.shape == (4, 100) and set(losses) == {"loss_ce", "loss_kd"} | (
        {"loss_dino"} if config.distill.dino_weight else set())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_published_gains_match_the_guide():
    top1 = {p.relative_to(REPO / "configs" / "cls").with_suffix("").as_posix(): load_cls_config(p).published.top1
            for p in ROWS}
    assert (top1["cifar100/res56_res20_kd"], top1["cifar100/res56_res20_kdpp"]) == (70.66, 72.53)
    assert (top1["cifar100/res32x4_res8x4_dkd"], top1["cifar100/res32x4_res8x4_dkdpp"]) == (75.44, 76.28)
    assert (top1["cifar100/wrn40_2_wrn40_1_reviewkd"], top1["cifar100/wrn40_2_wrn40_1_reviewkdpp"]) == (75.09, 75.66)
    assert (top1["imagenet/res34_res18_kd"], top1["imagenet/res34_res18_kdpp"]) == (70.66, 71.98)


def test_base_files_merge_and_cycles_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 7\n  batch_size: 16\ndistill:\n  method: dkd\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  epochs: 9\n")
    config = load_cls_config(str(tmp_path / "b.yaml"), ["train.seed=3"])
    assert (config.train.epochs, config.train.batch_size, config.train.seed, config.distill.method) == (9, 16, 3, "dkd")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_cls_config(str(tmp_path / "b.yaml"))


@pytest.mark.parametrize("overrides, message", [
    (["distill.method=fitnet"], "distill.method"),
    (["data.dataset=mnist"], "data.dataset"),
    (["data.dataset=cifar100", "data.root=/nowhere"], "cifar-100-python"),
    (["model.teacher=null"], "model.teacher"),
    (["model.student=resnet9"], "model.student"),
    (["model.teacher=tv:resnet19"], "model.teacher"),
    (["model.teacher=timm:no_such_net"], "model.teacher"),
    (["model.teacher_pretrained=/nowhere/t.pth"], "model.teacher_pretrained"),
    (["distill.dino_weight=1", "distill.class_means=null"], "clipkd cls centers"),
    (["optim.milestones=[5, 2]"], "optim.milestones"),
    (["train.epochs=0"], "train.epochs"),
])
def test_config_mistakes_name_the_key(tmp_path, overrides, message):
    teacher = tmp_path / "t.pt"
    teacher.write_bytes(b"")
    config = load_cls_config(str(REPO / "configs" / "cls" / "digits" / "student.yaml"),
                             [f"model.teacher_pretrained={teacher}", *overrides])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_cls_config(config)


def test_cls_cli_config_error_exits_2(tmp_path):
    result = clipkd("cls", "train", str(REPO / "configs" / "cls" / "digits" / "student.yaml"),
                     "distill.method=nope", f"train.output_dir={tmp_path}")
    assert result.returncode == 2 and "distill.method" in result.stderr


# ------------------------------------------------------------------------------------------------ data
def test_digits_split_is_stratified_and_fixed():
    data = build_data("digits", "")
    assert (len(data.train), len(data.val), data.num_classes) == (1433, 364, 10)  # ceil(n_class / 5) each
    image, label = data.val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    labels = torch.tensor([data.val[i][1] for i in range(len(data.val))])
    assert torch.bincount(labels, minlength=10).min() >= 35  # every class has its fifth in validation
    assert torch.equal(data.val[5][0], build_data("digits", "").val[5][0])


def test_cifar100_python_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        raw = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(n))}
        (folder / split).write_bytes(pickle.dumps(raw))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    data = build_data("cifar100", str(tmp_path))
    assert (len(data.train), len(data.val), data.num_classes) == (12, 6, 100)
    plain, label = data.train_plain[3]
    assert label == 3 and plain.shape == (3, 32, 32)
    first = pickle.loads((folder / "test").read_bytes())[b"data"][0].reshape(3, 32, 32)
    mean, std = torch.tensor((0.5071, 0.4865, 0.4409)), torch.tensor((0.2673, 0.2564, 0.2762))
    expected = (torch.from_numpy(first) / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(data.val[0][0], expected)


def test_toyworld_classification_split(toyworld_dir):
    from clipkd_dino.toyworld.captions import KINDS

    data = build_data("toyworld", str(toyworld_dir))
    rows = [line.split("\t") for line in (toyworld_dir / "val" / "zeroshot" / "samples.csv").read_text().splitlines()[1:]]
    assert len(data.val) == len(rows) > 0 and data.class_names == list(KINDS)
    assert sorted(data.val.labels.tolist()) == sorted(int(label) for _, label in rows)
    assert 0 < len(data.train) < 96  # the fixture's 96 training images, some with several objects


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> Path:
    """A WRN-16-2 teacher (pooled dim 128; the students have 64) trained for 2 epochs on 480 digits, via the CLI."""
    out = tmp_path_factory.mktemp("teacher")
    result = clipkd("cls", "train", str(REPO / "configs" / "cls" / "digits" / "teacher.yaml"), "model.student=wrn_16_2",
                     "train.epochs=2", "optim.milestones=[1]", "data.train_limit=480", f"train.output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "checkpoints" / "best.pt"


def test_centers_equal_a_direct_computation(digits_teacher, tmp_path):
    from clipkd_dino.classify.centers import compute_centers
    from clipkd_dino.models.cnn import create_classifier, load_classifier_weights
    from clipkd_dino.teacher.class_means import load_class_means

    for correct_only in (False, True):
        out = tmp_path / str(correct_only)
        config = load_cls_config(str(REPO / "configs" / "cls" / "digits" / "student.yaml"), [
            "model.teacher=wrn_16_2", f"model.teacher_pretrained={digits_teacher}", f"centers.out={out}",
            f"centers.correct_only={correct_only}", "data.train_limit=400"])
        summary = compute_centers(config)
        teacher = create_classifier("wrn_16_2", 10)
        load_classifier_weights(teacher, digits_teacher)
        teacher.eval()
        data = build_data("digits", "", train_limit=400)
        images = torch.stack([data.train_plain[i][0] for i in range(len(data.train_plain))])
        labels = torch.tensor([data.train_plain[i][1] for i in range(len(data.train_plain))])
        with torch.no_grad():
            out_t = teacher(images)
        right = out_t["logits"].argmax(1) == labels
        means, fallback = load_class_means(out), []
        for c in range(10):
            members = labels == c
            if correct_only and (right & members).any():
                members = right & members
            elif correct_only:
                fallback.append(str(c))  # no correct image: the class falls back to all its images
            assert int(means.counts[c]) == int(members.sum())
            torch.testing.assert_close(means.image[c], out_t["pooled"][members].double().mean(0).float(),
                                       atol=1e-5, rtol=1e-4)
        assert summary["classes_with_all_images"] == fallback
        assert summary["teacher_train_top1"] == pytest.approx(100 * right.float().mean().item(), abs=1e-3)


def _student_config(tmp_path: Path, teacher: Path, centers: Path) -> Path:
    raw = {"base": str(REPO / "configs" / "cls" / "digits" / "student.yaml"),
           "model": {"teacher": "wrn_16_2", "teacher_pretrained": str(teacher)},
           "data": {"train_limit": 128}, "train": {"epochs": 3, "batch_size": 32, "log_every_steps": 1,
                                                     "output_dir": str(tmp_path / "run")},
           "distill": {"dino_weight": 1.0, "class_means": str(centers)}, "centers": {"out": str(centers)}}
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_kdpp_student_trains_resumes_exactly_and_exports_without_projector(digits_teacher, tmp_path):
    from clipkd_dino.models.cnn import create_classifier

    config = _student_config(tmp_path, digits_teacher, tmp_path / "centers")
    assert clipkd("cls", "centers", str(config)).returncode == 0
    kill_and_resume_matches_uninterrupted(config, tmp_path, kill_after_step=4, total_steps=12,
                                          command=("cls", "train"), final=("last.pt", "model"))
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "kd" and summary["dino_weight"] == 1.0 and summary["epochs"] == 3
    logged = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss_ce", "loss_kd", "loss_dino"} <= set(logged)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    student = create_classifier("resnet8", 10)
    assert set(best["model"]) == set(student.state_dict())  # no projector, nothing but the student
    student.load_state_dict(best["model"])
    latest = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert any("projector" in key for key in latest["objective"])  # the projector is kept for resuming
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m["top1"] for m in metrics) == pytest.approx(best["top1"])


@pytest.mark.slow
def test_two_process_training_under_torchrun(digits_teacher, tmp_path):
    result = torchrun_cli(2, "cls", "train", str(REPO / "configs" / "cls" / "digits" / "student.yaml"),
                          "model.teacher=wrn_16_2", f"model.teacher_pretrained={digits_teacher}", "train.epochs=1",
                          "data.train_limit=128", "train.batch_size=16", f"train.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4  # 128 images / 2 processes / 16 per batch
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_missing_cifar_says_where_to_put_it(tmp_path):
    with pytest.raises(ConfigError, match="cifar-100-python"):
        build_data("cifar100", str(tmp_path))


def test_unreadable_cifar_file_is_named(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="meta"):
        build_data("cifar100", str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reviewkd"])  # the method with learnable extras of its own (ABF modules)
def test_plusplus_methods_train_under_ddp(digits_teacher, tmp_path, method):
    """ReviewKD++ (the dino-loss on) for a few steps on 2 gloo processes under torchrun."""
    config = _student_config(tmp_path, digits_teacher, tmp_path / "centers")
    raw = yaml.safe_load(config.read_text())
    raw["base"] = [raw["base"], str(REPO / "configs" / "cls" / "methods" / f"{method}.yaml")]
    raw["train"] |= {"epochs": 1, "batch_size": 16}
    config.write_text(yaml.safe_dump(raw))
    assert clipkd("cls", "centers", str(config)).returncode == 0
    result = torchrun_cli(2, "cls", "train", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == method and summary["dino_weight"] == 1.0
    assert summary["processes"] == 2 and summary["steps"] == 4  # 128 images / 2 processes / 16 per batch
    assert "loss_dino" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])


@pytest.fixture
def cosine_method():
    """A method declared the way a user adds one, in one class: CE + cosine_weight x (1 - cos(bridge(student
    pooled), teacher pooled)), with a learnable bridge of its own. Yields the bridges' initial weights."""
    from clipkd_dino.classify.distillers import DISTILLERS, ClassificationDistiller

    initial = []

    class CosineKD(ClassificationDistiller, method="cosine"):
        uses_teacher = True

        def __init__(self, student: nn.Module, teacher: nn.Module, *, cosine_weight: float = 1.0, **kwargs) -> None:
            super().__init__(student, teacher, **kwargs)
            self.cosine_weight = cosine_weight
            self.bridge = nn.Linear(student.feature_dim, teacher.feature_dim)
            initial.append(self.bridge.weight.detach().clone())

        def distill_term(self, student_out: dict, teacher_out: dict | None, targets: torch.Tensor) -> torch.Tensor:
            cos = F.cosine_similarity(self.bridge(student_out["pooled"]), teacher_out["pooled"], dim=-1)
            return self.cosine_weight * (1 - cos).mean()

    yield initial
    del DISTILLERS["cosine"]


def test_a_method_declared_in_one_class_trains_with_its_own_option(tmp_path, cosine_method):
    from clipkd_dino.models.cnn import create_classifier

    teacher = tmp_path / "teacher.pt"
    torch.save({"model": create_classifier("resnet8", 10).state_dict()}, teacher)
    run = tmp_path / "run"
    result = clipkd("cls", "train", str(REPO / "configs" / "cls" / "digits" / "student.yaml"), "distill.method=cosine",
                    "distill.cosine_weight=2.5", "distill.warmup_epochs=0", "model.teacher=resnet8",
                    f"model.teacher_pretrained={teacher}", "data.train_limit=32", "train.epochs=1",
                    "train.batch_size=32", "train.log_every_steps=1", f"train.output_dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["distill"]["cosine_weight"] == 2.5
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["loss_kd"] > 0
    (initial,) = cosine_method
    assert not torch.equal(torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["objective"]
                           ["bridge.weight"], initial)  # its own part trains
    with pytest.raises(ConfigError, match="distill.cosine_weight"):
        check_cls_config(load_cls_config(None, ["distill.method=cosine", "distill.cosine_weight=-1"]))
