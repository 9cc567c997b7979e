"""Classification distillers: one module per method family; the "++" variant is the same class with dino_weight > 0.

Each distiller owns the student and its learnable extras (the dino projector, ReviewKD's ABF modules) and returns
`(student logits, named weighted losses)`; the trainer only sums the dict. Keys: "loss_ce", "loss_kd" (the method's
distillation term, whatever the family, as in mdistiller) and "loss_dino" (only when dino_weight > 0).

The teacher is frozen (requires_grad False), always in eval mode (`train()` never flips it), runs under no_grad,
and is NOT a submodule: DDP never wraps it, `state_dict()` never saves it. It moves with the distiller (`.to()`,
`.cuda()`, `.double()`: `_apply` is forwarded to it).

Classifier interface (student and teacher): `model(x)` returns {"logits": [B, K], "pooled": [B, D],
"stages": list of [B, C_i, H_i, W_i] shallow -> deep with the stem first, "preact_stages": same shapes, pre-ReLU};
`model.feature_dim` is D, `model.stage_channels` the list of C_i.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from clipkd_dino.distill.distiller import dino_projector
from clipkd_dino.errors import ConfigError
from clipkd_dino.losses import dino_loss, dkd_loss, hcl_loss, kd_loss, kd_warmup_factor


class ClassificationDistiller(nn.Module):
    """CE + optional dino-loss; subclasses add their distillation term through `distill_term`.

    student, teacher: classifiers (interface in the module docstring); teacher may be None when nothing needs it.
    ce_weight: weight of the cross-entropy. dino_weight: weight of the dino-loss (0 = off; > 0 makes the "++"
    variant and needs the teacher and `class_means` [K, D_t], the teacher's pooled-feature mean per class).
    dino_m, dino_p, dino_reduction: the dino-loss's teacher-norm scale m, norm order p and reduction.
    dino_warmup: whether the dino term follows the same linear warm-up as the distillation term.
    warmup_epochs: the distillation term is multiplied by min(epoch / warmup_epochs, 1) (0 = no warm-up).
    """

    uses_teacher = False
    batch_wide = frozenset()  # every term is per sample (see engine.loop)
    uses_every_parameter = True  # DDP need not look for unused parameters

    def __init__(self, student: nn.Module, teacher: nn.Module | None, *, ce_weight: float = 1.0,
                 dino_weight: float = 0.0, class_means: torch.Tensor | None = None, dino_m: float = 0.0,
                 dino_p: float = 2.0, dino_reduction: Literal["sample", "class"] = "sample",
                 dino_warmup: bool = False, warmup_epochs: float = 20.0) -> None:
        super().__init__()
        if warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.student = student
        self.ce_weight, self.dino_weight, self.warmup_epochs = ce_weight, dino_weight, warmup_epochs
        self.dino_options = {"teacher_norm_scale": dino_m, "p": dino_p, "reduction": dino_reduction}
        self.dino_warmup = dino_warmup
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # a plain attribute, not a submodule
        if (self.uses_teacher or dino_weight) and teacher is None:
            raise ConfigError(f"{type(self).__name__}: this method needs a teacher"
                              + (" (dino_weight > 0)" if dino_weight else ""))
        if dino_weight:
            if class_means is None:
                raise ConfigError("dino_weight > 0 needs the class means of the teacher's pooled features")
            d_s, d_t = int(student.feature_dim), int(teacher.feature_dim)
            if class_means.ndim != 2 or class_means.shape[1] != d_t:
                raise ConfigError(f"class means have shape {tuple(class_means.shape)}, expected [K, {d_t}] "
                                  "(the teacher's feature dim)")
            self.register_buffer("class_means", class_means.detach().float().clone(), persistent=False)
            self.dino_projector = dino_projector(d_s, d_t)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    @property
    def needs_teacher(self) -> bool:
        return self.uses_teacher or bool(self.dino_weight)

    def train(self, mode: bool = True) -> ClassificationDistiller:
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .double() move the teacher along
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's weights only (no projector, no ABF, no teacher): what gets exported."""
        return self.student.state_dict()

    def distill_term(self, student_out: dict, teacher_out: dict | None, targets: torch.Tensor) -> torch.Tensor | None:
        """The method's weighted distillation term before warm-up (None: the method has none)."""
        return None

    def forward(self, images: torch.Tensor, targets: torch.Tensor, epoch: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images [B, 3, H, W], targets [B] int, epoch (fractional, from 0) -> (student logits [B, K], losses)."""
        student_out = self.student(images)
        teacher_out = None
        if self.needs_teacher:
            with torch.no_grad():
                teacher_out = self._teacher(images)
        losses = {"loss_ce": self.ce_weight * F.cross_entropy(student_out["logits"], targets)}
        factor = kd_warmup_factor(epoch, self.warmup_epochs)
        term = self.distill_term(student_out, teacher_out, targets)
        if term is not None:
            losses["loss_kd"] = factor * term
        if self.dino_weight:
            dino = dino_loss(self.dino_projector(student_out["pooled"]), teacher_out["pooled"], self.class_means,
                             targets, **self.dino_options)
            losses["loss_dino"] = (factor if self.dino_warmup else 1.0) * self.dino_weight * dino
        return student_out["logits"], losses


class Vanilla(ClassificationDistiller):
    """CE only, no teacher: trains teachers and baselines (a teacher is accepted only to feed a dino-loss)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(student, teacher, **kwargs)


class KD(ClassificationDistiller):
    """CE + kd_weight * KD(T) (Hinton et al. 2015); KD++ with dino_weight > 0."""

    uses_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, kd_weight: float = 1.0, temperature: float = 4.0,
                 **kwargs: Any) -> None:
        super().__init__(student, teacher, **kwargs)
        self.kd_weight, self.temperature = kd_weight, temperature

    def distill_term(self, student_out: dict, teacher_out: dict | None, targets: torch.Tensor) -> torch.Tensor:
        return self.kd_weight * kd_loss(student_out["logits"], teacher_out["logits"], self.temperature)


class DKD(ClassificationDistiller):
    """CE + alpha * TCKD + beta * NCKD (Zhao et al. 2022); defaults are mdistiller's CIFAR-100 ones."""

    uses_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, **kwargs: Any) -> None:
        super().__init__(student, teacher, **kwargs)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def distill_term(self, student_out: dict, teacher_out: dict | None, targets: torch.Tensor) -> torch.Tensor:
        return dkd_loss(student_out["logits"], teacher_out["logits"], targets, self.alpha, self.beta,
                        self.temperature)


class ABF(nn.Module):
    """ReviewKD's attention-based fusion of one student level with the fused residual of the deeper levels.

    in_channels -> 1x1 conv + BN -> mid_channels; when `fuse`, the residual (upsampled, nearest, to this level's
    size) and this level are mixed by a 2-channel spatial attention (1x1 conv + sigmoid over their concatenation);
    the result is resized to the teacher's size and mapped by a 3x3 conv + BN to out_channels.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.expand = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (self.reduce[0], self.expand[0]):  # the reference's initialisation
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C_in, H, W], residual [B, mid, h, w] or None -> (out [B, C_out, *out_size], fused [B, mid, *out_size]).

        The fused map is the residual handed to the next, shallower level."""
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            gates = self.attention(torch.cat([x, residual], dim=1))
            x = x * gates[:, :1] + residual * gates[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.expand(x), x


class ReviewKD(ClassificationDistiller):
    """CE + review_weight * HCL(ABF-fused student levels, teacher levels) (Chen et al. 2021).

    Levels (both sides): the stages without the stem, then the pooled feature as a 1x1 map. The teacher gives its
    pre-activation stages; the student its post-activation ones (`student_preact=True` for pre-activation). The
    ABF chain runs deepest first; each output takes the teacher level's channels and spatial size (read from the
    teacher's features at run time, so no shape is hard-coded). mid_channels: None = min(512, D_s), the rule of the
    reference's CIFAR code (64 for wrn40_1/resnet20, 256 for resnet8x4; its ImageNet code uses 512 for ResNet-18 and
    256 for MobileNet).
    """

    uses_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, review_weight: float = 1.0,
                 mid_channels: int | None = None, student_preact: bool = False, **kwargs: Any) -> None:
        super().__init__(student, teacher, **kwargs)
        self.review_weight, self.student_preact = review_weight, student_preact
        s_channels = [*student.stage_channels[1:], student.feature_dim]
        t_channels = [*teacher.stage_channels[1:], teacher.feature_dim]
        if len(s_channels) != len(t_channels):
            raise ConfigError(f"ReviewKD pairs student and teacher levels one to one: the student has "
                              f"{len(s_channels) - 1} stages after the stem, the teacher {len(t_channels) - 1}")
        mid = mid_channels if mid_channels is not None else min(512, int(student.feature_dim))
        last = len(s_channels) - 1
        self.abfs = nn.ModuleList(ABF(c_s, mid, c_t, fuse=i < last)
                                  for i, (c_s, c_t) in enumerate(zip(s_channels, t_channels)))

    @staticmethod
    def levels(out: dict, preact: bool) -> list[torch.Tensor]:
        """Stages after the stem (pre-activation when `preact`) + the pooled feature as [B, D, 1, 1]."""
        stages = out["preact_stages" if preact else "stages"][1:]
        return [*stages, out["pooled"][:, :, None, None]]

    def review(self, student_levels: list[torch.Tensor], out_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The ABF chain, deepest level first; returns one map per level, shallow -> deep, [B, C_t_i, *out_sizes[i]]."""
        outputs: list[torch.Tensor] = [None] * len(student_levels)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(student_levels))):
            outputs[i], residual = self.abfs[i](student_levels[i], residual, out_sizes[i])
        return outputs

    def distill_term(self, student_out: dict, teacher_out: dict | None, targets: torch.Tensor) -> torch.Tensor:
        teacher_levels = self.levels(teacher_out, preact=True)
        fused = self.review(self.levels(student_out, self.student_preact),
                            [tuple(t.shape[-2:]) for t in teacher_levels])
        return self.review_weight * hcl_loss(fused, teacher_levels)


DISTILLERS: dict[str, type[ClassificationDistiller]] = {"vanilla": Vanilla, "kd": KD, "dkd": DKD,
                                                         "reviewkd": ReviewKD}


def _options(cls: type[ClassificationDistiller]) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        if "__init__" in vars(klass):
            names |= {name for name, p in inspect.signature(klass.__init__).parameters.items()
                      if p.kind is p.KEYWORD_ONLY}
    return names


def build_distiller(method: str, student: nn.Module, teacher: nn.Module | None,
                    **kwargs: Any) -> ClassificationDistiller:
    """The distiller of `method` ("vanilla", "kd", "dkd", "reviewkd"); "++" = the same with dino_weight > 0."""
    cls = DISTILLERS.get(method)
    if cls is None:
        raise ConfigError(f"unknown distillation method {method!r}: choose one of {', '.join(DISTILLERS)}")
    unknown = sorted(set(kwargs) - _options(cls))
    if unknown:
        raise ConfigError(f"method {method!r} has no option {', '.join(map(repr, unknown))} "
                          f"(options: {', '.join(sorted(_options(cls)))})")
    return cls(student, teacher, **kwargs)
