"""The CLIP distiller: student + the parts of its loss terms, a frozen teacher (online or cached), named losses.

`forward(batch)` returns {"loss_task", "loss_crd", ...}: one weighted loss per term with a weight > 0, in the order
of `terms.TERMS`; the trainer sums and logs them. The terms (what each reads, whether it is batch-wide, its parts)
are declared in `terms.py`; everything here follows from those declarations.

- Batch-wide (contrastive) terms use the global batch (all-gathered with exact gradients, each gathered embedding
  once per step); the others are per-sample means over the local batch.
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

from typing import Any

import torch
from torch import nn

from clipkd_dino.config import DistillConfig
from clipkd_dino.distill.objectives import with_micro_batch
from clipkd_dino.distill.terms import (EMBEDDINGS, TERMS, Part, Setting, embeddings_read, parts_needed, reads,
                                       term_weights, towers_read)
from clipkd_dino.engine.distributed import all_gather_with_grad
from clipkd_dino.losses.clip import learnable_scale
from clipkd_dino.models.factory import PixelNormaliser


def as_constant(part: Any) -> Any:
    """A part without gradient: a tensor detached, a module called with its parameters detached."""
    if isinstance(part, nn.Module):
        detached = {name: p.detach() for name, p in part.named_parameters()}
        return lambda *args: torch.func.functional_call(part, detached, args)
    return part.detach()


class CLIPDistiller(nn.Module):
    """Owns the student (`model`) and the parts of its terms; reads the teacher through `teacher.features(batch)`.

    `weights`: {term name: weight} of the terms on. `batch_wide`: the loss names that see the whole accumulated
    batch (the trainer does not divide them by the accumulation steps). `uses_every_parameter`: whether every
    learnable part gets a gradient at every step (else DDP must look for unused ones): the parts are only built
    for the terms on, so it comes down to the towers and the logit scale being read.
    """

    def __init__(self, model: nn.Module, teacher, config: DistillConfig, student_dim: int,
                 class_means: torch.Tensor | None = None, text_class_means: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.teacher, self.config, self.pixels = model, teacher, config, PixelNormaliser(model)
        self.views, self.num_views = teacher.views, teacher.num_views
        self.weights = term_weights(config.weights, teacher.dim)
        self.terms = tuple(TERMS[name] for name in self.weights)
        setting = Setting(model, student_dim, teacher.dim, config, class_means, text_class_means)
        for part in parts_needed(self.terms):
            self._add_part(part, part.build(setting))
        self.embeddings = embeddings_read(self.terms)  # what `embed` computes, in order
        self.embedded = [name for name in EMBEDDINGS if any(name in term.inputs for term in self.terms)]  # returns
        self.gathered = [name for name in self.embedded if any(name in t.inputs for t in self.terms if t.batch_wide)]
        self.batch_wide = frozenset(term.loss_name for term in self.terms if term.batch_wide)
        self.uses_every_parameter = towers_read(self.terms) == {"image", "text"} and "logit_scale" in reads(self.terms)

    def _add_part(self, part: Part, built: nn.Module | nn.Parameter | torch.Tensor) -> None:
        if part.shared:
            object.__setattr__(self, part.name, built)
        elif isinstance(built, (nn.Module, nn.Parameter)):
            setattr(self, part.name, built)
        else:
            self.register_buffer(part.name, built, persistent=False)

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """The per-sample tensors the terms read (`terms.EMBEDDINGS`). batch: images [B, 3, H, W] (uint8 pixels),
        texts [B, L], labels [B] (with the dino-loss), the teacher's embeddings (from a cache)."""
        values = {"batch": batch, "model": self.model, "teacher": self.teacher, "pixels": self.pixels}
        for embedding in self.embeddings:
            values[embedding.name] = embedding.compute(*(values[name] if name in values else getattr(self, name)
                                                         for name in embedding.inputs))
        return {name: values[name] for name in self.embedded}

    def forward(self, batch: dict, accumulated: list[dict] | None = None, index: int = 0) -> dict[str, torch.Tensor]:
        """Named losses of a batch. With `accumulated` (the `embed` of every micro-batch of the optimiser step,
        without gradient) the batch-wide terms see the whole accumulated batch, micro-batch `index` (this one)
        with its gradient, as open_clip's `accum_freq`; the per-sample terms see this micro-batch."""
        local = self.embed(batch)
        if not accumulated:
            return self.losses(local, local)
        return self.losses(local, with_micro_batch(accumulated, local, index), index == len(accumulated) - 1)

    def losses(self, local: dict[str, torch.Tensor], whole: dict[str, torch.Tensor],
               scales_grad: bool = True) -> dict[str, torch.Tensor]:
        """Batch-wide terms over `whole` (all-gathered across processes), per-sample terms over `local`. Without
        `scales_grad` the parts and scales the batch-wide terms apply to the whole batch (the logit and ICL
        scales, AFD's fusions) get no gradient: under accumulation only the last micro-batch's pass gives them
        theirs, so that the k passes sum to the whole batch's gradient."""
        gathered = {name: all_gather_with_grad(whole[name]) for name in self.gathered}
        losses = {}
        for term, weight in zip(self.terms, self.weights.values()):
            constant = term.batch_wide and not scales_grad
            values = gathered if term.batch_wide else local
            inputs = (values[name] if name in values else self._read(name, constant) for name in term.inputs)
            losses[term.loss_name] = weight * term.loss(*inputs, **term.options(self.config))
        return losses

    def _read(self, name: str, constant: bool) -> Any:
        """A scale or a part, without gradient when `constant`."""
        if name == "teacher_logit_scale":
            return self.teacher.logit_scale
        if name == "logit_scale":
            scale = self.model.logit_scale
            return learnable_scale(scale.detach() if constant else scale)
        part = getattr(self, name)
        return as_constant(part) if constant else part
