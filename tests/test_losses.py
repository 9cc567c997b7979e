"""Loss functions against hand computations (explicit loops over the formulas), gradients and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clipkd_dino.losses import afd_loss, clip_loss, crd_loss, dino_loss, fd_loss, gd_loss, icl_loss
from clipkd_dino.losses.clipkd import contrastive_gradients


def feats(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(rows: torch.Tensor) -> list[list[float]]:
    out = []
    for row in rows.tolist():
        norm = math.sqrt(sum(x * x for x in row))
        out.append([x / norm for x in row])
    return out


def scaled_sims(a: torch.Tensor, b: torch.Tensor, scale: float) -> list[list[float]]:
    """scale * cos(a_i, b_j) by loops."""
    ua, ub = unit(a), unit(b)
    return [[scale * sum(x * y for x, y in zip(r, c)) for c in ub] for r in ua]


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m)]


def log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def ce_diag(logits: list[list[float]]) -> float:
    return -sum(log_softmax(row)[i] for i, row in enumerate(logits)) / len(logits)


def kl_rows(target: list[list[float]], logits: list[list[float]]) -> float:
    total = 0.0
    for t_row, s_row in zip(target, logits):
        lt, ls = log_softmax(t_row), log_softmax(s_row)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return total / len(target)


def hand_clip(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    z = scaled_sims(image, text, scale)
    return (ce_diag(z) + ce_diag(transpose(z))) / 2


def autograd_contrastive_grads(image: torch.Tensor, text: torch.Tensor, scale: float):
    """autograd of the symmetric CE written out, w.r.t. unit features that enter the logits directly."""
    image, text = image.detach().requires_grad_(), text.detach().requires_grad_()
    z = scale * image @ text.t()
    n = z.shape[0]
    loss = -(z.diagonal() - z.logsumexp(dim=1)).sum() / (2 * n) - (z.diagonal() - z.logsumexp(dim=0)).sum() / (2 * n)
    return torch.autograd.grad(loss, (image, text))


def normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ----- CLIP-KD losses ---------------------------------------------------------------------------------------------

def test_clip_loss_normalises_inside_and_matches_hand():
    image, text = feats(3, 4, seed=0), feats(3, 4, seed=1)
    expected = hand_clip(image, text, 2.5)
    rescaled = image * torch.tensor([[0.1], [3.0], [7.0]], dtype=torch.float64)
    assert clip_loss(image, text, 2.5).item() == pytest.approx(expected, rel=1e-12)
    assert clip_loss(rescaled, text, torch.tensor(2.5)).item() == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(lambda i, t: clip_loss(i, t, 2.5),
                                    (image.requires_grad_(), text.requires_grad_()))


def test_crd_matches_hand_and_teacher_gets_no_gradient():
    s_image, s_text = feats(3, 4, seed=2).requires_grad_(), feats(3, 4, seed=3).requires_grad_()
    t_image, t_text = feats(3, 6, seed=4).requires_grad_(), feats(3, 6, seed=5).requires_grad_()
    s_z, t_z = scaled_sims(s_image, s_text, 2.0), scaled_sims(t_image, t_text, 5.0)
    expected = (kl_rows(t_z, s_z) + kl_rows(transpose(t_z), transpose(s_z))) / 2
    loss = crd_loss(s_image, s_text, t_image, t_text, torch.tensor(2.0), torch.tensor(5.0))
    assert loss.item() == pytest.approx(expected, rel=1e-10) and expected > 0
    loss.backward()
    assert t_image.grad is None and t_text.grad is None and s_image.grad is not None
    assert torch.autograd.gradcheck(lambda i, t: crd_loss(i, t, t_image, t_text, 2.0, 5.0), (s_image, s_text))


def test_crd_is_zero_when_student_equals_teacher():
    image, text = feats(3, 4, seed=6), feats(3, 4, seed=7)
    assert crd_loss(image * 3, text * 0.5, image, text, 4.0, 4.0).item() == pytest.approx(0, abs=1e-12)


def test_fd_matches_hand():
    s_image, s_text, t_image, t_text = (feats(3, 4, seed=k) for k in range(8, 12))
    expected = 0.0
    for s, t in ((s_image, t_image), (s_text, t_text)):
        expected += sum((a - b) ** 2 for rs, rt in zip(unit(s), unit(t)) for a, b in zip(rs, rt)) / 12
    assert fd_loss(s_image, s_text, t_image, t_text).item() == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(lambda i, t: fd_loss(i, t, t_image, t_text),
                                    (s_image.requires_grad_(), s_text.requires_grad_()))


def test_icl_matches_hand():
    s_image, s_text, t_image, t_text = (feats(3, 4, seed=k) for k in range(12, 16))
    expected = (ce_diag(scaled_sims(s_image, t_text, 1 / 0.07)) + ce_diag(scaled_sims(s_text, t_image, 1 / 0.07))) / 2
    assert icl_loss(s_image, s_text, t_image, t_text, 1 / 0.07).item() == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(lambda i, t: icl_loss(i, t, t_image, t_text, 3.0),
                                    (s_image.requires_grad_(), s_text.requires_grad_()))


def test_contrastive_gradients_equal_autograd():
    x, y = feats(3, 4, seed=16), feats(3, 4, seed=17)
    u, v = normalised(x), normalised(y)
    analytic = contrastive_gradients(u, v, 3.0)
    for got, want in zip(analytic, autograd_contrastive_grads(u, v, 3.0)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Through clip_loss, which normalises inside: d/dx = (I - u u^T) dL/du / ||x|| (chain rule through x / ||x||).
    x.requires_grad_(), y.requires_grad_()
    grad_x, grad_y = torch.autograd.grad(clip_loss(x, y, 3.0), (x, y))
    for got, g, feature, direction in ((grad_x, analytic[0], x, u), (grad_y, analytic[1], y, v)):
        chained = (g - (g * direction).sum(-1, keepdim=True) * direction) / feature.detach().norm(dim=-1, keepdim=True)
        torch.testing.assert_close(got, chained, rtol=1e-10, atol=1e-12)


def test_gd_matches_autograd_gradients_and_is_differentiable():
    s_image, s_text, t_image, t_text = (feats(3, 4, seed=k) for k in range(18, 22))
    s_grads = autograd_contrastive_grads(normalised(s_image), normalised(s_text), 2.0)
    t_grads = autograd_contrastive_grads(normalised(t_image), normalised(t_text), 10.0)
    expected = sum(((a - b) ** 2).mean() for a, b in zip(s_grads, t_grads)).item()
    t_image.requires_grad_()
    loss = gd_loss(s_image, s_text, t_image, t_text, 2.0, torch.tensor(10.0))
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert loss.requires_grad is False  # nothing on the student side requires grad: the teacher is detached
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, k: gd_loss(i, t, t_image, t_text, k, 10.0),
                                    (s_image.requires_grad_(), s_text.requires_grad_(), scale))


def test_afd_with_differing_dims():
    s_image, s_text = feats(3, 3, seed=22).requires_grad_(), feats(3, 3, seed=23).requires_grad_()
    t_image, t_text = feats(3, 5, seed=24).requires_grad_(), feats(3, 5, seed=25).requires_grad_()
    torch.manual_seed(0)
    fusion_image, fusion_text = nn.Linear(8, 4).double(), nn.Linear(8, 4).double()

    def fuse(linear: nn.Linear, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w, b = linear.weight.tolist(), linear.bias.tolist()
        rows = [rs + rt for rs, rt in zip(unit(s), unit(t))]
        return torch.tensor([[sum(wk * xk for wk, xk in zip(w_row, row)) + bj for w_row, bj in zip(w, b)]
                             for row in rows], dtype=torch.float64)

    expected = hand_clip(fuse(fusion_image, s_image, t_image), fuse(fusion_text, s_text, t_text), 4.0)
    loss = afd_loss(s_image, s_text, t_image, t_text, fusion_image, fusion_text, 4.0)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert t_image.grad is None and t_text.grad is None
    assert s_image.grad is not None and fusion_image.weight.grad is not None and fusion_text.weight.grad is not None
    assert torch.autograd.gradcheck(
        lambda i, t: afd_loss(i, t, t_image, t_text, fusion_image, fusion_text, 4.0), (s_image, s_text))


# ----- dino-loss --------------------------------------------------------------------------------------------------

def p_norm(row: list[float], p: float) -> float:
    return max(abs(x) for x in row) if p == math.inf else sum(abs(x) ** p for x in row) ** (1 / p)


def hand_dino(student, teacher, means, labels, m: float, p: float, reduction: str) -> float:
    units = unit(means)
    terms: dict[int, list[float]] = {}
    for s, t, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        if y < 0:
            continue
        dot = sum(a * b for a, b in zip(s, units[y]))
        terms.setdefault(y, []).append(1 - dot / max(p_norm(s, p), (1 + m) * p_norm(t, p)))
    if reduction == "sample":
        flat = [x for xs in terms.values() for x in xs]
        return sum(flat) / len(flat)
    return sum(sum(xs) / len(xs) for xs in terms.values()) / len(terms)


def dino_batch():
    """6 samples, 4 classes (class 3 absent), one ignored; rows 0-2 well below the teacher's norm, 3-5 well above."""
    student = feats(6, 4, seed=30) * torch.tensor([[0.1], [0.15], [0.12], [20.0], [25.0], [30.0]], dtype=torch.float64)
    teacher = 2 * normalised(feats(6, 4, seed=31))
    means = feats(4, 4, seed=32) * 3
    labels = torch.tensor([0, 2, -1, 0, 1, 0])
    return student, teacher, means, labels


@pytest.mark.parametrize("p", [1, 2, 3, math.inf])
@pytest.mark.parametrize("m", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["sample", "class"])
def test_dino_loss_matches_hand_both_regimes(p, m, reduction):
    student, teacher, means, labels = dino_batch()
    s_norms = [p_norm(r, p) for r in student.tolist()]
    t_norms = [(1 + m) * p_norm(r, p) for r in teacher.tolist()]
    assert all(s < t for s, t in zip(s_norms[:3], t_norms[:3])) and all(s > t for s, t in zip(s_norms[3:], t_norms[3:]))
    expected = hand_dino(student, teacher, means, labels, m, p, reduction)
    got = dino_loss(student, teacher, means, labels, teacher_norm_scale=m, p=float(p), reduction=reduction)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: dino_loss(s, teacher, means, labels, teacher_norm_scale=m, p=p, reduction=reduction), (student,))


def test_dino_reductions_differ_on_unbalanced_classes():
    student, teacher, means, labels = dino_batch()
    assert dino_loss(student, teacher, means, labels).item() != pytest.approx(
        dino_loss(student, teacher, means, labels, reduction="class").item())


def test_dino_hand_gradient_below_and_above_the_teacher_norm():
    m = 0.5
    means = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # row 0: ||s|| = 1 < 1.5 * 2 (below); row 1: ||s|| = 5 > 1.5 * 1 (above); row 2 ignored
    student = torch.tensor([[0.6, 0.0, 0.8], [3.0, 0.0, 4.0], [9.0, 9.0, 9.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, -1])
    dino_loss(student, teacher, means, labels, teacher_norm_scale=m).backward()
    e0, e1 = means[0] / 5, means[1] / 2
    s1 = student.detach()[1]
    below = -e0 / ((1 + m) * 2.0)
    above = -(e1 / s1.norm() - (s1 @ e1) * s1 / s1.norm() ** 3)  # gradient of 1 - cos(s, e)
    torch.testing.assert_close(student.grad, torch.stack([below, above, torch.zeros(3, dtype=torch.float64)]) / 2)


def test_dino_teacher_gets_no_gradient():
    student, teacher, means, labels = dino_batch()
    teacher.requires_grad_()
    means.requires_grad_()
    dino_loss(student.requires_grad_(), teacher, means, labels).backward()
    assert teacher.grad is None and means.grad is None and student.grad is not None


@pytest.mark.parametrize("reduction", ["sample", "class"])
def test_dino_all_ignored_batch_is_a_connected_zero(reduction):
    student, teacher, means, _ = dino_batch()
    student = torch.cat([student, torch.zeros(1, 4, dtype=torch.float64)]).requires_grad_()
    teacher = torch.cat([teacher, torch.zeros(1, 4, dtype=torch.float64)])
    loss = dino_loss(student, teacher, means, torch.full((7,), -1), reduction=reduction)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_dino_rejects_unknown_reduction():
    student, teacher, means, labels = dino_batch()
    with pytest.raises(ValueError, match="reduction"):
        dino_loss(student, teacher, means, labels, reduction="mean")
