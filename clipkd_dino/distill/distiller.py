"""The CLIP distiller: student + projectors + learnable scales, a frozen teacher (online or cached), named losses.

`forward(batch)` returns {"loss_task", "loss_crd", "loss_icl", "loss_fd", "loss_mfd", "loss_gd", "loss_afd",
"loss_dino", "loss_dino_text"}, each already weighted, only those with a weight > 0; the trainer sums and logs them.

- Contrastive terms (task, CRD, ICL, GD, AFD) use the global batch (all-gathered with exact gradients); FD, MFD and
  the dino-loss are per-sample means over the local batch.
- When the student's embedding dim differs from the teacher's, `Linear(d_s, d_t)` projectors map the student's
  image and text features before FD, MFD, ICL and GD (CLIP-KD), and a separate BatchNorm1d -> Dropout(0.5) ->
  Linear projector feeds each dino-loss (KD++); AFD fuses [student; teacher] with Linear(d_s + d_t, d_t).
- ICL's scale is learnable: exp of a parameter initialised at ln(icl_init_scale), clamped to 100 like the logit
  scale (the public CLIP-KD code uses the raw parameter as a multiplier).
- MFD really masks: a second forward of the student's image tower with `mask_ratio` of its patch tokens dropped
  (open_clip's PatchDropout, in a view of the tower that shares its weights), compared with the teacher's features
  of the full image.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from clipkd_dino.config import DistillConfig
from clipkd_dino.errors import ConfigError
from clipkd_dino.models.factory import PixelNormaliser
from clipkd_dino.losses import afd_loss, clip_loss, crd_loss, dino_loss, fd_loss, gd_loss, icl_loss
from clipkd_dino.engine.distributed import all_gather_with_grad
from clipkd_dino.distill.objectives import CONTRASTIVE_LOSSES, MAX_LOGIT_SCALE, with_micro_batch

FD_REFERENCE_DIM = 512
FD_REFERENCE_WEIGHT = 2000.0


def fd_weight(configured: float | None, dim: int) -> float:
    """FD's weight: as configured, else the recipe's 2000 scaled from D = 512 to `dim` (FD is an element mean)."""
    return configured if configured is not None else FD_REFERENCE_WEIGHT * dim / FD_REFERENCE_DIM


def _projector(d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out) if d_in != d_out else nn.Identity()


def masked_tower(visual: nn.Module, ratio: float) -> nn.Module:
    """The student's image tower dropping `ratio` of its patch tokens: the same submodules and weights with a
    PatchDropout of its own. Kept outside the module tree (no second copy in state dicts), so the forward never
    swaps modules (which would break `torch.compile`'s graphs)."""
    from open_clip.transformer import PatchDropout

    masked = copy.copy(visual)
    masked._modules = dict(visual._modules)
    masked.patch_dropout = PatchDropout(ratio)
    return masked


def dino_projector(d_in: int, d_out: int) -> nn.Module:
    """KD++'s projector for the dino-loss: BatchNorm1d -> Dropout(0.5) -> Linear (identity when dims match)."""
    if d_in == d_out:
        return nn.Identity()
    return nn.Sequential(nn.BatchNorm1d(d_in), nn.Dropout(0.5), nn.Linear(d_in, d_out))


class CLIPDistiller(nn.Module):
    """Owns the student (`model`) and every learnable extra; reads the teacher through `teacher.features(batch)`."""

    batch_wide = frozenset(CONTRASTIVE_LOSSES)  # over the whole step under accumulation (see engine.loop)

    def __init__(self, model: nn.Module, teacher, config: DistillConfig, student_dim: int,
                 class_means: torch.Tensor | None = None, text_class_means: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.teacher, self.config, self.pixels = model, teacher, config, PixelNormaliser(model)
        self.views, self.num_views = teacher.views, teacher.num_views
        weights = config.weights
        d_s, d_t = student_dim, teacher.dim
        self.weights = {"task": weights.task, "crd": weights.crd, "icl": weights.icl,
                        "fd": fd_weight(weights.fd, d_t), "mfd": weights.mfd, "gd": weights.gd, "afd": weights.afd,
                        "dino": weights.dino, "dino_text": weights.dino_text}
        if any(self.weights[name] for name in ("fd", "mfd", "icl", "gd")):  # DDP wants every parameter used
            self.project_image, self.project_text = _projector(d_s, d_t), _projector(d_s, d_t)
        if weights.icl:
            self.icl_log_scale = nn.Parameter(torch.tensor(math.log(config.icl_init_scale)))
        if weights.afd:
            self.fuse_image, self.fuse_text = nn.Linear(d_s + d_t, d_t), nn.Linear(d_s + d_t, d_t)
        if weights.mfd:
            if not hasattr(model.visual, "patch_dropout"):
                raise ConfigError("config key 'distill.weights.mfd': MFD masks patch tokens and needs a ViT student")
            object.__setattr__(self, "_masked_visual", masked_tower(model.visual, config.mask_ratio))
        for side, means in (("dino", class_means), ("dino_text", text_class_means)):
            if self.weights[side]:
                if means is None:
                    raise ConfigError(f"config key 'distill.weights.{side}' needs 'distill.labels' (the output "
                                      "folder of `clipkd label`, with class means)")
                if means.shape[1] != d_t:
                    raise ConfigError(f"distill.labels: class means have dim {means.shape[1]}, the teacher {d_t}")
                self.register_buffer(f"{side}_means", means.float(), persistent=False)
                setattr(self, f"{side}_projector", dino_projector(d_s, d_t))

    @property
    def uses_every_parameter(self) -> bool:
        """Whether the recipe gives every learnable part a gradient (else DDP must look for unused ones at each
        step): the logit scale needs task, CRD, GD or AFD; each tower needs a term that reads it. The extras are
        only built when a term uses them."""
        w = {name: bool(weight) for name, weight in self.weights.items()}
        image = any(w[n] for n in ("task", "crd", "fd", "mfd", "icl", "gd", "afd", "dino"))
        text = any(w[n] for n in ("task", "crd", "fd", "mfd", "icl", "gd", "afd", "dino_text"))
        return image and text and any(w[n] for n in ("task", "crd", "gd", "afd"))

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """What the losses read per sample: the student's image and text embeddings (and their projections, the
        masked image's), the teacher's (`teachers.py`), the labels. batch: images [B, 3, H, W] (uint8 pixels),
        texts [B, L], labels [B] (with the dino-loss)."""
        w = self.weights
        images = self.pixels(batch["images"])
        out = {"s_image": self.model.encode_image(images), "s_text": self.model.encode_text(batch["texts"])}
        out["t_image"], out["t_text"] = self.teacher.features(batch)
        if w["fd"] or w["mfd"] or w["icl"] or w["gd"]:
            out["p_image"], out["p_text"] = self.project_image(out["s_image"]), self.project_text(out["s_text"])
        if w["mfd"]:
            out["masked"] = self.project_image(self._masked_visual(images))
        if w["dino"] or w["dino_text"]:
            out["labels"] = batch["labels"].to(out["s_image"].device, non_blocking=True)
        return out

    def forward(self, batch: dict, accumulated: list[dict] | None = None, index: int = 0) -> dict[str, torch.Tensor]:
        """Named losses of a batch. With `accumulated` (the `embed` of every micro-batch of the optimiser step,
        without gradient) the contrastive terms see the whole accumulated batch, micro-batch `index` (this one)
        with its gradient, as open_clip's `accum_freq`; the per-sample terms see this micro-batch."""
        local = self.embed(batch)
        if not accumulated:
            return self.losses(local, local)
        return self.losses(local, with_micro_batch(accumulated, local, index), index == len(accumulated) - 1)

    def losses(self, local: dict[str, torch.Tensor], whole: dict[str, torch.Tensor],
               scales_grad: bool = True) -> dict[str, torch.Tensor]:
        """Contrastive terms (task, CRD, ICL, GD, AFD) over `whole` (all-gathered across processes), per-sample
        terms (FD, MFD, dino) over `local`. Without `scales_grad` the parameters the contrastive terms apply to the
        whole batch (the logit and ICL scales, AFD's fusions) get no gradient: under accumulation only the last
        micro-batch's pass gives them theirs, so that the k passes sum to the whole batch's gradient."""
        w = self.weights
        own = (lambda t: t) if scales_grad else (lambda t: t.detach())
        scale = own(self.model.logit_scale).exp().clamp(max=MAX_LOGIT_SCALE)
        gather = all_gather_with_grad
        losses: dict[str, torch.Tensor] = {}
        if w["task"] or w["crd"] or w["afd"] or w["icl"] or w["gd"]:
            gt_image, gt_text = gather(whole["t_image"]), gather(whole["t_text"])
        if w["task"] or w["crd"] or w["afd"]:
            g_image = gather(F.normalize(whole["s_image"], dim=-1))
            g_text = gather(F.normalize(whole["s_text"], dim=-1))
        if w["task"]:
            losses["loss_task"] = w["task"] * clip_loss(g_image, g_text, scale)
        if w["crd"]:
            losses["loss_crd"] = w["crd"] * crd_loss(g_image, g_text, gt_image, gt_text, scale,
                                                     self.teacher.logit_scale)
        if w["fd"]:
            losses["loss_fd"] = w["fd"] * fd_loss(local["p_image"], local["p_text"], local["t_image"],
                                                  local["t_text"])
        if w["mfd"]:
            losses["loss_mfd"] = w["mfd"] * fd_loss(local["masked"], local["p_text"], local["t_image"],
                                                    local["t_text"])
        if w["icl"] or w["gd"]:
            gp_image, gp_text = gather(whole["p_image"]), gather(whole["p_text"])
            if w["icl"]:
                icl_scale = own(self.icl_log_scale).exp().clamp(max=MAX_LOGIT_SCALE)
                losses["loss_icl"] = w["icl"] * icl_loss(gp_image, gp_text, gt_image, gt_text, icl_scale)
            if w["gd"]:
                losses["loss_gd"] = w["gd"] * gd_loss(gp_image, gp_text, gt_image, gt_text, scale,
                                                      self.teacher.logit_scale)
        if w["afd"]:
            fusions = [lambda x, m=m: F.linear(x, own(m.weight), own(m.bias)) for m in (self.fuse_image,
                                                                                        self.fuse_text)]
            losses["loss_afd"] = w["afd"] * afd_loss(g_image, g_text, gt_image, gt_text, *fusions, scale)
        if w["dino"] or w["dino_text"]:
            options = {"teacher_norm_scale": self.config.dino_m, "p": self.config.dino_p,
                       "reduction": self.config.dino_reduction}
            if w["dino"]:
                losses["loss_dino"] = w["dino"] * dino_loss(self.dino_projector(local["s_image"]), local["t_image"],
                                                            self.dino_means, local["labels"], **options)
            if w["dino_text"]:
                losses["loss_dino_text"] = w["dino_text"] * dino_loss(
                    self.dino_text_projector(local["s_text"]), local["t_text"], self.dino_text_means,
                    local["labels"], **options)
        return losses
