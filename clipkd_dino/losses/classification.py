"""Classification-mode distillation losses: KD (Hinton), DKD (Zhao et al. 2022), ReviewKD's HCL (Chen et al. 2021)
and the linear warm-up of the KD-family term. CE is `F.cross_entropy`; the dino-loss is `clipkd_dino.losses.dino`.
Definitions, choices and the reference code's defects: docs/losses.md, section "Classification losses"."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkd_dino.errors import ConfigError

HCL_POOL_SIZES = (4, 2, 1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), summed over classes, mean over samples, times T^2.

    student_logits, teacher_logits: [B, K] (the teacher's are detached). temperature: T > 0. Returns a scalar.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def _binary_kl(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_t || p_s) of distributions given as log-probabilities, [B, C] -> [B]."""
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def _dkd_parts(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log [p_target, 1 - p_target] ([B, 2]) and the log-softmax over the non-target classes ([B, K - 1]).

    Computed in log space (log(1 - p_target) = logsumexp of the non-target logits - logsumexp of all of them), so
    neither underflows when the target probability is close to 0 or 1.
    """
    z = logits / temperature
    batch, classes = z.shape
    is_target = F.one_hot(target, classes).bool()
    others = z[~is_target].view(batch, classes - 1)  # row-major order: each row keeps its K - 1 non-target logits
    log_all = torch.logsumexp(z, dim=1, keepdim=True)
    log_target = z.gather(1, target[:, None]) - log_all
    log_other = torch.logsumexp(others, dim=1, keepdim=True) - log_all
    return torch.cat([log_target, log_other], dim=1), F.log_softmax(others, dim=1)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float,
             beta: float, temperature: float) -> torch.Tensor:
    """Decoupled KD: alpha * TCKD + beta * NCKD, each a KL (teacher || student) times T^2, mean over samples.

    TCKD compares the binary distributions [p_target, 1 - p_target]; NCKD the distributions over the K - 1
    non-target classes (the target removed, the rest renormalised), all at temperature T.
    student_logits, teacher_logits: [B, K] with K >= 3 (the teacher's are detached). target: [B] int in [0, K).
    Returns a scalar. Raises ConfigError for K < 3 (the non-target part is empty for K = 2).
    """
    classes = student_logits.shape[1]
    if classes < 3:
        raise ConfigError(f"DKD needs at least 3 classes (its non-target part is empty for K = 2), got K = {classes}: "
                          "use method 'kd' instead")
    target = target.reshape(-1).long()
    binary_s, others_s = _dkd_parts(student_logits, target, temperature)
    binary_t, others_t = _dkd_parts(teacher_logits.detach(), target, temperature)
    tckd = _binary_kl(binary_t, binary_s).mean()
    nckd = _binary_kl(others_t, others_s).mean()
    return (alpha * tckd + beta * nckd) * temperature ** 2


def hcl_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss, summed over the feature levels.

    student_feats, teacher_feats: lists of the same length, level i of shape [B, C_i, H_i, W_i] on both sides (the
    teacher's are detached). Per level: the MSE (element mean) at full size, then at each adaptive-average-pooled
    size l x l for l in (4, 2, 1) with l < min(H_i, W_i), weighted 1, 1/2, 1/4, ... and divided by the sum of the
    weights used. Returns a scalar.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"hcl_loss: {len(student_feats)} student levels but {len(teacher_feats)} teacher levels")
    total = student_feats[0].new_zeros(())
    for level, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        if fs.shape != ft.shape:
            raise ValueError(f"hcl_loss: level {level} has student shape {tuple(fs.shape)}, teacher "
                             f"{tuple(ft.shape)}")
        ft = ft.detach()
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in HCL_POOL_SIZES:
            if size >= min(fs.shape[-2:]):
                continue
            weight /= 2
            weights += weight
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total = total + loss / weights
    return total


def kd_warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear warm-up of a distillation term: min(epoch / warmup_epochs, 1); 1 when warmup_epochs is 0.

    epoch: the (possibly fractional) epoch, counted from 0.
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return 1.0
    return min(max(epoch, 0.0) / warmup_epochs, 1.0)
