"""Classification mode: KD, DKD and HCL against hand computations, gradients, and the distillers' contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipkd_dino.classify.distillers import DKD, KD, ClassificationDistiller, ReviewKD, Vanilla, create_distiller
from clipkd_dino.errors import ConfigError
from clipkd_dino.losses import dino_loss, dkd_loss, hcl_loss, kd_loss, kd_warmup_factor


class TinyNet(nn.Module):
    """A tiny classifier with the project's interface: a stem and one stride-2 conv stage per extra width."""

    def __init__(self, widths: tuple[int, ...] = (4, 8, 16), num_classes: int = 5, stem_stride: int = 1) -> None:
        super().__init__()
        self.stage_channels, self.feature_dim = list(widths), widths[-1]
        convs, c_in = [], 3
        for i, width in enumerate(widths):
            stride = stem_stride if i == 0 else 2
            convs.append(nn.Sequential(nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)))
            c_in = width
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> dict:
        stages, preact = [], []
        for conv in self.convs:
            x = conv(x)
            preact.append(x)
            x = F.relu(x)
            stages.append(x)
        pooled = x.mean(dim=(2, 3))
        return {"logits": self.fc(pooled), "pooled": pooled, "stages": stages, "preact_stages": preact}


def seeded(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


STUDENT = np.array([[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]])
TEACHER = np.array([[2.0, 1.0, -1.0], [0.5, 0.5, 4.0]])


# --- KD -----------------------------------------------------------------------------------------------------------

def test_kd_loss_matches_hand_computation() -> None:
    T = 4.0
    by_hand = sum(kl(softmax(t / T), softmax(s / T)) for s, t in zip(STUDENT, TEACHER)) / 2 * T ** 2
    got = kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), T)
    assert got.item() == pytest.approx(by_hand, rel=1e-10)
    # the first row by explicit arithmetic: p = softmax([2, 1, -1] / 4), q = softmax([1, 2, 0.5] / 4)
    p = [math.exp(v / 4) for v in (2.0, 1.0, -1.0)]
    q = [math.exp(v / 4) for v in (1.0, 2.0, 0.5)]
    p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
    row0 = 16 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kd_loss(torch.tensor(STUDENT[:1]), torch.tensor(TEACHER[:1]), T).item() == pytest.approx(row0, rel=1e-10)


def test_kd_loss_zero_for_equal_logits_and_no_teacher_grad() -> None:
    s = seeded(4, 6, seed=0).requires_grad_()
    t = s.detach().clone().requires_grad_()
    loss = kd_loss(s, t, 2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    kd_loss(s, t * 2, 2.0).backward()
    assert t.grad is None and s.grad is not None


# --- DKD ----------------------------------------------------------------------------------------------------------

def dkd_by_hand(student: np.ndarray, teacher: np.ndarray, target: list[int], alpha: float, beta: float,
                T: float) -> tuple[float, float, float]:
    """(TCKD, NCKD, loss) from the paper's definitions, batch-mean, times T^2."""
    tckd = nckd = 0.0
    for s, t, y in zip(student, teacher, target):
        ps, pt = softmax(s / T), softmax(t / T)
        bs, bt = np.array([ps[y], 1 - ps[y]]), np.array([pt[y], 1 - pt[y]])
        tckd += kl(bt, bs)
        others = [k for k in range(len(s)) if k != y]
        qs, qt = ps[others] / ps[others].sum(), pt[others] / pt[others].sum()
        nckd += kl(qt, qs)
    n = len(target)
    tckd, nckd = tckd / n * T ** 2, nckd / n * T ** 2
    return tckd, nckd, alpha * tckd + beta * nckd


def test_dkd_loss_matches_hand_computation() -> None:
    student = np.array([[1.0, 2.0, 0.5, -0.3], [-1.0, 0.0, 3.0, 1.2], [0.2, 0.1, -2.0, 0.7]])
    teacher = np.array([[2.0, 1.0, -1.0, 0.0], [0.5, 0.5, 4.0, -1.0], [1.5, -0.5, 0.3, 2.2]])
    target = [0, 2, 3]
    args = (torch.tensor(student), torch.tensor(teacher), torch.tensor(target))
    tckd, nckd, loss = dkd_by_hand(student, teacher, target, alpha=1.0, beta=8.0, T=4.0)
    assert dkd_loss(*args, alpha=1.0, beta=8.0, temperature=4.0).item() == pytest.approx(loss, rel=1e-10)
    assert dkd_loss(*args, alpha=1.0, beta=0.0, temperature=4.0).item() == pytest.approx(tckd, rel=1e-10)
    assert dkd_loss(*args, alpha=0.0, beta=1.0, temperature=4.0).item() == pytest.approx(nckd, rel=1e-10)
    assert tckd > 0 and nckd > 0


def test_dkd_decomposes_kd_per_sample() -> None:
    """The paper's identity, one sample at a time: KD = TCKD + (1 - p_target^teacher) * NCKD."""
    s, t = seeded(3, 7, seed=1, dtype=torch.float64), seeded(3, 7, seed=2, dtype=torch.float64)
    target, T = torch.tensor([0, 3, 6]), 3.0
    for i in range(3):
        p_target = F.softmax(t[i] / T, dim=0)[target[i]].item()
        decomposed = dkd_loss(s[i:i + 1], t[i:i + 1], target[i:i + 1], 1.0, 1.0 - p_target, T)
        assert decomposed.item() == pytest.approx(kd_loss(s[i:i + 1], t[i:i + 1], T).item(), rel=1e-10)


def test_dkd_is_stable_for_confident_logits() -> None:
    """A student sure of a wrong class: p_target underflows in float32 (log(p) = -inf, NaN gradients, if taken
    naively); in log space the float32 loss matches float64 and the gradient is finite."""
    s = torch.tensor([[-60.0, 60.0, 0.0], [0.0, -80.0, 80.0]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.0, 0.0]])
    target = torch.tensor([0, 1])
    loss = dkd_loss(s, t, target, 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(dkd_loss(s.double(), t.double(), target, 1.0, 8.0, 1.0).item(), rel=1e-6)


def test_dkd_needs_three_classes() -> None:
    with pytest.raises(ConfigError, match="at least 3 classes"):
        dkd_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), 1.0, 8.0, 4.0)


def test_kd_and_dkd_gradcheck() -> None:
    s = seeded(3, 5, seed=3, dtype=torch.float64).requires_grad_()
    t = seeded(3, 5, seed=4, dtype=torch.float64)
    target = torch.tensor([1, 0, 4])
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 2.0), (s,))
    assert torch.autograd.gradcheck(lambda x: dkd_loss(x, t, target, 1.0, 8.0, 2.0), (s,))


# --- HCL ----------------------------------------------------------------------------------------------------------

def test_hcl_loss_hand_case() -> None:
    """A 4x4 level (pyramid: full, 2x2, 1x1, weights 1, 1/2, 1/4) plus a 1x1 level (full size only)."""
    teacher = [torch.arange(16.0).view(1, 1, 4, 4), torch.full((1, 1, 1, 1), 3.0)]
    student = [torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 1, 1)]
    full = sum(k * k for k in range(16)) / 16  # 77.5
    quad = (2.5 ** 2 + 4.5 ** 2 + 10.5 ** 2 + 12.5 ** 2) / 4  # 2x2 block means of 0..15: 73.25
    single = 7.5 ** 2  # 56.25
    expected = (full + quad / 2 + single / 4) / 1.75 + (3.0 - 1.0) ** 2
    assert hcl_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(73.25 + 4.0)


def test_hcl_loss_full_pyramid_against_numpy() -> None:
    """8x8 maps: levels full, 4, 2, 1 with weights 1, 1/2, 1/4, 1/8 (pooling by block means in numpy)."""
    fs, ft = seeded(2, 3, 8, 8, seed=5, dtype=torch.float64), seeded(2, 3, 8, 8, seed=6, dtype=torch.float64)
    a, b = fs.numpy(), ft.numpy()

    def pool(x: np.ndarray, size: int) -> np.ndarray:
        k = 8 // size
        return x.reshape(2, 3, size, k, size, k).mean(axis=(3, 5))

    terms = [np.mean((a - b) ** 2)] + [np.mean((pool(a, n) - pool(b, n)) ** 2) for n in (4, 2, 1)]
    weights = [1, 0.5, 0.25, 0.125]
    expected = sum(w * t for w, t in zip(weights, terms)) / sum(weights)
    assert hcl_loss([fs], [ft]).item() == pytest.approx(expected, rel=1e-10)


def test_hcl_loss_shape_errors() -> None:
    with pytest.raises(ValueError, match="levels"):
        hcl_loss([torch.zeros(1, 1, 2, 2)], [])
    with pytest.raises(ValueError, match="level 0"):
        hcl_loss([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 2, 2, 2)])


def test_kd_warmup_factor() -> None:
    assert kd_warmup_factor(0, 20) == 0.0
    assert kd_warmup_factor(10, 20) == 0.5
    assert kd_warmup_factor(25.5, 20) == 1.0
    assert kd_warmup_factor(0, 0) == 1.0


# --- distillers ---------------------------------------------------------------------------------------------------

def pair(student_widths=(4, 6, 8), teacher_widths=(4, 8, 16), **teacher_kwargs) -> tuple[TinyNet, TinyNet]:
    torch.manual_seed(0)
    return TinyNet(student_widths), TinyNet(teacher_widths, **teacher_kwargs)


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return seeded(n, 3, 16, 16, seed=7), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2][:n])


def means(dim: int = 16) -> torch.Tensor:
    return seeded(5, dim, seed=8)


@pytest.mark.parametrize("method", ["kd", "dkd", "reviewkd"])
def test_teacher_frozen_in_eval_and_not_a_submodule(method: str) -> None:
    student, teacher = pair()
    distiller = create_distiller(method, student, teacher, dino_weight=1.0, class_means=means())
    distiller.train()
    assert student.training and not any(m.training for m in teacher.modules())
    images, targets = batch()
    logits, losses = distiller(images, targets, epoch=30.0)
    assert logits.shape == (4, 5) and set(losses) == {"loss_ce", "loss_kd", "loss_dino"}
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.fc.weight.grad is not None
    assert not any(k.startswith("_teacher") or k.startswith("teacher") for k in distiller.state_dict())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    assert not any(m is teacher for m in distiller.modules())
    distiller.to(torch.float64)  # the teacher moves with the distiller
    assert next(teacher.parameters()).dtype == torch.float64 and distiller.teacher is teacher


def test_dino_term_only_when_weighted_and_uses_true_labels() -> None:
    student, teacher = pair()
    images, targets = batch()
    _, losses = create_distiller("kd", student, teacher)(images, targets, epoch=30.0)
    assert set(losses) == {"loss_ce", "loss_kd"}
    distiller = create_distiller("kd", student, teacher, dino_weight=2.0, class_means=means())
    assert isinstance(distiller.dino_projector, nn.Sequential)  # 8 -> 16: BatchNorm1d -> Dropout -> Linear
    distiller.eval()
    _, losses = distiller(images, targets, epoch=30.0)
    with torch.no_grad():
        expected = 2.0 * dino_loss(distiller.dino_projector(student(images)["pooled"]), teacher(images)["pooled"],
                                   means(), targets)
        assert losses["loss_dino"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="class means"):
        create_distiller("kd", student, teacher, dino_weight=1.0)
    with pytest.raises(ConfigError, match=r"\[K, 16\]"):
        create_distiller("kd", student, teacher, dino_weight=1.0, class_means=means(8))


def test_warmup_scales_the_kd_term_and_optionally_the_dino_term() -> None:
    student, teacher = pair()
    images, targets = batch()
    distiller = DKD(student, teacher, warmup_epochs=20.0, dino_weight=1.0, class_means=means())
    distiller.eval()
    with torch.no_grad():
        at = {epoch: distiller(images, targets, epoch=epoch)[1] for epoch in (0.0, 10.0, 40.0)}
    assert at[0.0]["loss_kd"].item() == 0.0
    assert at[10.0]["loss_kd"].item() == pytest.approx(at[40.0]["loss_kd"].item() / 2, rel=1e-6)
    assert at[0.0]["loss_dino"].item() == pytest.approx(at[40.0]["loss_dino"].item()) and at[0.0]["loss_dino"] > 0
    distiller.dino_warmup = True
    with torch.no_grad():
        assert distiller(images, targets, epoch=0.0)[1]["loss_dino"].item() == 0.0


def test_reviewkd_shapes_follow_the_teacher() -> None:
    """Student levels 8x8, 4x4, 1x1; the teacher's stem has stride 2, so its levels are 4x4, 2x2, 1x1."""
    student, teacher = pair(stem_stride=2)
    distiller = ReviewKD(student, teacher, review_mid_channels=6)
    images, _ = batch()
    s_out, t_out = student(images), teacher(images)
    t_levels = ReviewKD.levels(t_out, preact=True)
    fused = distiller.review(ReviewKD.levels(s_out, False), [tuple(t.shape[-2:]) for t in t_levels])
    assert [tuple(f.shape) for f in fused] == [(4, 8, 4, 4), (4, 16, 2, 2), (4, 16, 1, 1)]
    assert [tuple(f.shape) for f in fused] == [tuple(t.shape) for t in t_levels]
    assert distiller.abfs[-1].attention is None and distiller.abfs[0].attention is not None
    _, losses = distiller(images, batch()[1], epoch=20.0)
    assert losses["loss_kd"].item() > 0
    with pytest.raises(ConfigError, match="stages after the stem"):
        ReviewKD(student, TinyNet((4, 8)))


def test_student_state_dict_exports_the_student_only() -> None:
    student, teacher = pair()
    distiller = create_distiller("reviewkd", student, teacher, dino_weight=1.0, class_means=means())
    assert any(k.startswith("abfs.") for k in distiller.state_dict())
    exported = distiller.student_state_dict()
    assert not any("abf" in k or "projector" in k or "teacher" in k for k in exported)
    TinyNet((4, 6, 8)).load_state_dict(exported, strict=True)


def test_vanilla_and_factory_errors() -> None:
    student, _ = pair()
    images, targets = batch()
    distiller = create_distiller("vanilla", student, None)
    assert isinstance(distiller, Vanilla) and isinstance(distiller, ClassificationDistiller)
    logits, losses = distiller(images, targets, epoch=0.0)
    assert set(losses) == {"loss_ce"}
    assert losses["loss_ce"].item() == pytest.approx(F.cross_entropy(logits, targets).item())
    with pytest.raises(ConfigError, match="'fitnet'"):
        create_distiller("fitnet", student, None)
    with pytest.raises(ConfigError, match="needs a teacher"):
        KD(student, None)
    with pytest.raises(ConfigError, match="'dkd_alpha'"):
        create_distiller("kd", student, pair()[1], dkd_alpha=1.0)
