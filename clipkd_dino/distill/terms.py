"""The CLIP distiller's loss terms, each declared once: to add a term, add a `Term` to `TERMS` here (or
`register_term` it from your own module), with its math a pure function in `clipkd_dino/losses/`. Docs:
docs/losses.md, "Adding a term".

A term names what it reads (`inputs`, in the order of its loss function's arguments):
- embeddings (`EMBEDDINGS`, per sample; `CLIPDistiller.embed` computes those some term reads): s_image, s_text
  (the student's), t_image, t_text (the teacher's), n_image, n_text (the student's, L2-normalised), p_image, p_text
  (the student's through CLIP-KD's projectors), masked (MFD's masked image, projected), labels (pseudo-labels [B]);
- the scales: logit_scale (the student's, exponentiated and clamped), teacher_logit_scale;
- parts (`Part`): what the distiller builds for the terms on (projectors, learnable scales, class means).
A batch-wide term (contrastive) sees its embeddings all-gathered over the processes and, under gradient
accumulation, over the step's micro-batches; the parts and scales it reads get their gradient from the step's last
micro-batch only. A per-sample term sees its local micro-batch. Its loss is logged as "loss_{name}", weighted by
`distill.weights.{name}` (0 or absent: off).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from clipkd_dino.config import DistillConfig
from clipkd_dino.errors import ConfigError
from clipkd_dino.losses import afd_loss, clip_loss, crd_loss, dino_loss, fd_loss, gd_loss, icl_loss
from clipkd_dino.losses.clip import learnable_scale
from clipkd_dino.models.projectors import dino_projector, linear_projector

FD_REFERENCE_DIM = 512
FD_REFERENCE_WEIGHT = 2000.0


@dataclass(frozen=True)
class Setting:
    """What parts are built from: the student, the dims, the `distill:` config, the class means of the labels."""

    model: nn.Module
    student_dim: int
    teacher_dim: int
    config: DistillConfig
    class_means: torch.Tensor | None  # [C, teacher_dim] of the images, None without labels
    text_class_means: torch.Tensor | None  # [C, teacher_dim] of the captions


@dataclass(frozen=True)
class Part:
    """A piece a term (or an embedding) needs, built once per distiller whoever else needs it, as its attribute
    `name` (the state-dict prefix): a module or parameter is trained and saved, a plain tensor is a non-persistent
    buffer. `shared`: a module sharing the student's weights, kept out of the module tree (no second copy saved)."""

    name: str
    build: Callable[[Setting], nn.Module | nn.Parameter | torch.Tensor]
    shared: bool = False


@dataclass(frozen=True)
class Embedding:
    """A per-sample tensor [B, ...] computed by `embed` from `inputs` (embeddings, parts or the sources: "batch",
    "model" (the student), "teacher", "pixels" (the student's pixel normaliser)). `tower`: the student tower it
    runs, if any (what DDP must know)."""

    name: str
    inputs: tuple[str, ...]
    compute: Callable[..., Any]
    parts: tuple[Part, ...] = ()
    tower: Literal["image", "text"] | None = None


@dataclass(frozen=True)
class Term:
    """A named loss term. `loss(*inputs, **options(config))` is its unweighted value (a scalar).
    `default_weight`: the weight a null `distill.weights.{name}` stands for, from the teacher's embedding dim."""

    name: str
    inputs: tuple[str, ...]
    loss: Callable[..., torch.Tensor]
    batch_wide: bool = False
    parts: tuple[Part, ...] = ()
    options: Callable[[DistillConfig], dict[str, Any]] = lambda config: {}
    default_weight: Callable[[int], float] | None = None

    @property
    def loss_name(self) -> str:
        return f"loss_{self.name}"


# ---------------------------------------------------------------------------------------------------- parts
def masked_tower(visual: nn.Module, ratio: float) -> nn.Module:
    """The student's image tower dropping `ratio` of its patch tokens: the same submodules and weights with a
    PatchDropout of its own (so the forward never swaps modules, which would break `torch.compile`'s graphs)."""
    from open_clip.transformer import PatchDropout

    if not hasattr(visual, "patch_dropout"):
        raise ConfigError("config key 'distill.weights.mfd': MFD masks patch tokens and needs a ViT student")
    masked = copy.copy(visual)
    masked._modules = dict(visual._modules)
    masked.patch_dropout = PatchDropout(ratio)
    return masked


def checked_class_means(means: torch.Tensor | None, term: str, teacher_dim: int) -> torch.Tensor:
    """The class means [C, teacher_dim] a dino term reads (float32); ConfigError naming the term's weight key."""
    if means is None:
        raise ConfigError(f"config key 'distill.weights.{term}' needs 'distill.labels' (the output folder of "
                          "`clipkd label`, with class means)")
    if means.shape[1] != teacher_dim:
        raise ConfigError(f"distill.labels: class means have dim {means.shape[1]}, the teacher {teacher_dim}")
    return means.float()


PROJECT_IMAGE = Part("project_image", lambda s: linear_projector(s.student_dim, s.teacher_dim))
PROJECT_TEXT = Part("project_text", lambda s: linear_projector(s.student_dim, s.teacher_dim))
MASKED_VISUAL = Part("_masked_visual", lambda s: masked_tower(s.model.visual, s.config.mask_ratio), shared=True)


def dino_parts(term: str, means: Callable[[Setting], torch.Tensor | None]) -> tuple[Part, Part]:
    """A dino term's class means (`{term}_means`) and KD++ projector (`{term}_projector`)."""
    return (Part(f"{term}_means", lambda s: checked_class_means(means(s), term, s.teacher_dim)),
            Part(f"{term}_projector", lambda s: dino_projector(s.student_dim, s.teacher_dim)))


# ----------------------------------------------------------------------------------------------- embeddings
# In the order `embed` computes them: each after its inputs, and the projections before the normalised features
# (the order the autograd graph had before the declarations, so gradients sum in the same order).
EMBEDDINGS: dict[str, Embedding] = {e.name: e for e in (
    Embedding("images", ("batch", "pixels"), lambda batch, pixels: pixels(batch["images"])),
    Embedding("s_image", ("images", "model"), lambda images, model: model.encode_image(images), tower="image"),
    Embedding("s_text", ("batch", "model"), lambda batch, model: model.encode_text(batch["texts"]), tower="text"),
    Embedding("t_features", ("batch", "teacher"), lambda batch, teacher: teacher.features(batch)),
    Embedding("t_image", ("t_features",), lambda features: features[0]),
    Embedding("t_text", ("t_features",), lambda features: features[1]),
    Embedding("p_image", ("s_image", "project_image"), lambda s, project: project(s), parts=(PROJECT_IMAGE,)),
    Embedding("p_text", ("s_text", "project_text"), lambda s, project: project(s), parts=(PROJECT_TEXT,)),
    Embedding("masked", ("images", "_masked_visual", "project_image"), lambda images, tower, project:
              project(tower(images)), parts=(MASKED_VISUAL, PROJECT_IMAGE), tower="image"),
    Embedding("n_image", ("s_image",), lambda s: F.normalize(s, dim=-1)),
    Embedding("n_text", ("s_text",), lambda s: F.normalize(s, dim=-1)),
    Embedding("labels", ("batch", "model"), lambda batch, model: batch["labels"].to(model.logit_scale.device,
                                                                                     non_blocking=True)),
)}


# ---------------------------------------------------------------------------------------------------- terms
def _icl(s_image: torch.Tensor, s_text: torch.Tensor, t_image: torch.Tensor, t_text: torch.Tensor,
         log_scale: torch.Tensor) -> torch.Tensor:
    """ICL with its learnable scale exp(log_scale) (clamped like the logit scale)."""
    return icl_loss(s_image, s_text, t_image, t_text, learnable_scale(log_scale))


def _dino(student: torch.Tensor, teacher: torch.Tensor, means: torch.Tensor, labels: torch.Tensor,
          projector: nn.Module, **options: Any) -> torch.Tensor:
    """The dino-loss of the projected student features (student [B, D_s], teacher [B, D_t], means [C, D_t])."""
    return dino_loss(projector(student), teacher, means, labels, **options)


def _dino_options(config: DistillConfig) -> dict[str, Any]:
    return {"teacher_norm_scale": config.dino_m, "p": config.dino_p, "reduction": config.dino_reduction}


FEATURES = ("t_image", "t_text")
TERMS: dict[str, Term] = {t.name: t for t in (
    Term("task", ("n_image", "n_text", "logit_scale"), clip_loss, batch_wide=True),
    Term("crd", ("n_image", "n_text", *FEATURES, "logit_scale", "teacher_logit_scale"), crd_loss, batch_wide=True),
    Term("fd", ("p_image", "p_text", *FEATURES), fd_loss,
         default_weight=lambda dim: FD_REFERENCE_WEIGHT * dim / FD_REFERENCE_DIM),  # FD is an element mean: 1/D
    Term("mfd", ("masked", "p_text", *FEATURES), fd_loss),
    Term("icl", ("p_image", "p_text", *FEATURES, "icl_log_scale"), _icl, batch_wide=True,
         parts=(Part("icl_log_scale", lambda s: nn.Parameter(torch.tensor(math.log(s.config.icl_init_scale)))),)),
    Term("gd", ("p_image", "p_text", *FEATURES, "logit_scale", "teacher_logit_scale"), gd_loss, batch_wide=True),
    Term("afd", ("n_image", "n_text", *FEATURES, "fuse_image", "fuse_text", "logit_scale"), afd_loss,
         batch_wide=True, parts=tuple(Part(name, lambda s: nn.Linear(s.student_dim + s.teacher_dim, s.teacher_dim))
                                      for name in ("fuse_image", "fuse_text"))),
    Term("dino", ("s_image", "t_image", "dino_means", "labels", "dino_projector"), _dino,
         parts=dino_parts("dino", lambda s: s.class_means), options=_dino_options),
    Term("dino_text", ("s_text", "t_text", "dino_text_means", "labels", "dino_text_projector"), _dino,
         parts=dino_parts("dino_text", lambda s: s.text_class_means), options=_dino_options),
)}


def register_term(term: Term) -> Term:
    """Add `term` to `TERMS` (after the built-in ones: its loss is computed last)."""
    if term.name in TERMS:
        raise ValueError(f"a loss term named {term.name!r} is already declared")
    TERMS[term.name] = term
    return term


# ------------------------------------------------------------------------------ what follows from the terms
def enabled_terms(weights: dict[str, float | None]) -> list[Term]:
    """The terms with a non-zero (or null: default) weight in `distill.weights`, in `TERMS` order; ConfigError
    naming an unknown weight key."""
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ConfigError(f"unknown config key 'distill.weights.{unknown[0]}' (known: {', '.join(sorted(TERMS))})")
    return [term for name, term in TERMS.items() if name in weights and weights[name] != 0]


def term_weights(weights: dict[str, float | None], teacher_dim: int) -> dict[str, float]:
    """{name: weight} of the enabled terms, a null replaced by the term's default for `teacher_dim`."""
    resolved = {}
    for term in enabled_terms(weights):
        weight = weights[term.name]
        if weight is None and term.default_weight is None:
            raise ConfigError(f"config key 'distill.weights.{term.name}' must be a number, got None")
        resolved[term.name] = term.default_weight(teacher_dim) if weight is None else weight
    return resolved


def reads(terms: Iterable[Term]) -> set[str]:
    """Every name the terms read, directly or through the embeddings they read."""
    seen: set[str] = set()
    todo = [name for term in terms for name in term.inputs]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(EMBEDDINGS[name].inputs if name in EMBEDDINGS else ())
    return seen


def embeddings_read(terms: Iterable[Term]) -> list[Embedding]:
    """The embeddings `embed` computes for `terms`, in `EMBEDDINGS` order (each after its inputs)."""
    read = reads(terms)
    return [embedding for name, embedding in EMBEDDINGS.items() if name in read]


def parts_needed(terms: Iterable[Term]) -> list[Part]:
    """The parts of the terms and of the embeddings they read, each once, term by term and input by input (the
    build order, and so the order in which they draw their random initial weights)."""
    def parts_of(name: str) -> list[Part]:
        embedding = EMBEDDINGS.get(name)
        return [*(p for n in embedding.inputs for p in parts_of(n)), *embedding.parts] if embedding else []

    parts: dict[str, Part] = {}
    for term in terms:
        for part in (*(p for name in term.inputs for p in parts_of(name)), *term.parts):
            parts.setdefault(part.name, part)
    return list(parts.values())


def towers_read(terms: Iterable[Term]) -> set[str]:
    """The student towers ("image", "text") whose output some term reads."""
    return {e.tower for e in embeddings_read(terms) if e.tower}
