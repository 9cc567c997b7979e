"""CLIP-KD distillation losses (CRD, FD, ICL, GD, AFD): student S against a frozen teacher T.

Features come as the models return them (any norm) and are L2-normalised here. `*_logit_scale` and `scale` are
multipliers, already exponentiated. The teacher side is detached. Every function returns the unweighted term.
Docs: docs/losses.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from clipkd_dino.losses.clip import Scale, clip_loss, diagonal_cross_entropy, similarity_logits


def _kl_rows(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target row) || softmax(row)), summed over columns, mean over rows; [N, M] each -> scalar."""
    return F.kl_div(logits.log_softmax(dim=1), target_logits.log_softmax(dim=1), reduction="batchmean",
                    log_target=True)


def crd_loss(s_image: torch.Tensor, s_text: torch.Tensor, t_image: torch.Tensor, t_text: torch.Tensor,
             s_logit_scale: Scale, t_logit_scale: Scale) -> torch.Tensor:
    """Contrastive relational distillation: the student's image-text similarity distributions match the teacher's.

    s_image, s_text: [N, D_s]; t_image, t_text: [N, D_t] (dims may differ). Returns a scalar: the mean over the
    image->text rows and the text->image rows (columns) of KL(softmax(teacher logits) || softmax(student logits)),
    temperature 1, summed over classes, averaged over rows.
    """
    s_logits = similarity_logits(s_image, s_text, s_logit_scale)
    t_logits = similarity_logits(t_image, t_text, t_logit_scale).detach()
    return (_kl_rows(t_logits, s_logits) + _kl_rows(t_logits.t(), s_logits.t())) / 2


def fd_loss(s_image: torch.Tensor, s_text: torch.Tensor, t_image: torch.Tensor, t_text: torch.Tensor) -> torch.Tensor:
    """Feature distillation: MSE(S_v, T_v) + MSE(S_t, T_t) of the L2-normalised features, element mean each.

    All inputs [N, D] (the student already projected to the teacher dim). Returns a scalar. Its size scales as 1/D.
    """
    return sum(F.mse_loss(F.normalize(s, dim=-1), F.normalize(t.detach(), dim=-1))
               for s, t in ((s_image, t_image), (s_text, t_text)))


def icl_loss(s_image: torch.Tensor, s_text: torch.Tensor, t_image: torch.Tensor, t_text: torch.Tensor,
             scale: Scale) -> torch.Tensor:
    """Interactive contrastive learning: student anchors against teacher keys.

    All inputs [N, D] (student projected to the teacher dim). scale: multiplier, already exponentiated (the caller
    exponentiates a learnable log-scale). Returns a scalar: (CE(scale * S_v T_t^T, arange) + CE(scale * S_t T_v^T,
    arange)) / 2.
    """
    return (diagonal_cross_entropy(similarity_logits(s_image, t_text.detach(), scale))
            + diagonal_cross_entropy(similarity_logits(s_text, t_image.detach(), scale))) / 2


def contrastive_gradients(image: torch.Tensor, text: torch.Tensor,
                          logit_scale: Scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic gradients of the symmetric InfoNCE loss w.r.t. the unit embeddings entering its logits.

    image, text: [N, D], L2-normalised. With Z = tau I T^T, P = softmax(Z, rows), Q = softmax(Z, columns):
    dL/dZ = G = (P + Q - 2 Id) / (2N), so dL/dI = tau G T and dL/dT = tau G^T I. Returns ([N, D], [N, D]);
    differentiable in its inputs.
    """
    logits = logit_scale * image @ text.t()
    eye = torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device)
    grad_logits = logit_scale * (logits.softmax(dim=1) + logits.softmax(dim=0) - 2 * eye) / (2 * logits.shape[0])
    return grad_logits @ text, grad_logits.t() @ image


def gd_loss(s_image: torch.Tensor, s_text: torch.Tensor, t_image: torch.Tensor, t_text: torch.Tensor,
            s_logit_scale: Scale, t_logit_scale: Scale) -> torch.Tensor:
    """Gradient distillation: MSE between the student's and the teacher's contrastive-loss gradients.

    All inputs [N, D] (student projected to the teacher dim), normalised here. Returns a scalar:
    MSE(dL_s/dS_v, dL_t/dT_v) + MSE(dL_s/dS_t, dL_t/dT_t), element mean each, gradients from
    `contrastive_gradients` (multiplied by the logit scale). The student's gradient expression is differentiated
    through; the teacher's is a constant.
    """
    s_grads = contrastive_gradients(F.normalize(s_image, dim=-1), F.normalize(s_text, dim=-1), s_logit_scale)
    with torch.no_grad():
        t_grads = contrastive_gradients(F.normalize(t_image, dim=-1), F.normalize(t_text, dim=-1), t_logit_scale)
    return sum(F.mse_loss(s, t) for s, t in zip(s_grads, t_grads))


def afd_loss(s_image: torch.Tensor, s_text: torch.Tensor, t_image: torch.Tensor, t_text: torch.Tensor,
             fusion_image: Callable[[torch.Tensor], torch.Tensor], fusion_text: Callable[[torch.Tensor], torch.Tensor],
             logit_scale: Scale) -> torch.Tensor:
    """Augmented feature distillation: the CLIP loss on learned fusions of student and teacher features.

    s_image, s_text: [N, D_s]; t_image, t_text: [N, D_t] (dims may differ). fusion_image, fusion_text: maps
    [N, D_s + D_t] -> [N, D_f], e.g. nn.Linear(D_s + D_t, D_f) (pass one module twice to share it).
    Returns a scalar: clip_loss(fusion_image([s_v; t_v]), fusion_text([s_t; t_t]), logit_scale), every feature
    L2-normalised before the concatenation.
    """
    def fuse(fusion: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return fusion(torch.cat([F.normalize(s, dim=-1), F.normalize(t.detach(), dim=-1)], dim=-1))

    return clip_loss(fuse(fusion_image, s_image, t_image), fuse(fusion_text, s_text, t_text), logit_scale)
