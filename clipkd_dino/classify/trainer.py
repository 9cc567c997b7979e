"""`clipkd cls train`: SGD with a step schedule for CNN students (KD, DKD, ReviewKD and their ++ variants), a task
of the run engine (`engine.loop`).

Outputs in `train.output_dir`:
  config.yaml               the resolved configuration
  checkpoints/latest.pt     everything a resumed run needs (student + distiller extras, optimiser, every rank's random
                            state, best so far)
  checkpoints/best.pt       the student with the best validation top-1: {"model": state_dict, ...} (the CRD layout,
  checkpoints/last.pt       so a trained student can teach in turn); no projector, no ABF, no optimiser
  log.jsonl, metrics.jsonl, tensorboard/, summary.json

`latest.pt` is written after every epoch and when a SIGTERM / SIGINT stops the run (at the next step). A resumed run
continues at the saved batch: the epoch's order is a function of (seed, epoch) and every rank's generators are
restored, so with `data.workers: 0` a resumed run on the CPU, alone or under torchrun, ends with the weights of one
that was never stopped (with worker processes, the augmentations of the resumed epoch's remaining batches are drawn
anew). Steps with a non-finite loss or gradient are skipped (`train.max_nonfinite_steps` in a row stop the run);
one run per output folder (a lock)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from clipkd_dino.classify.centers import load_teacher, read_centers
from clipkd_dino.classify.config import ClsConfig, check_cls_config
from clipkd_dino.classify.data import build_data, collate_classification
from clipkd_dino.data.loader import batches as loader_batches
from clipkd_dino.data.loader import data_loader
from clipkd_dino.data.pairs import SkipFirst
from clipkd_dino.engine.distributed import DistInfo
from clipkd_dino.engine.guard import save_checkpoint
from clipkd_dino.engine.loop import Engine, RunSettings, Task
from clipkd_dino.errors import ConfigError
from clipkd_dino.runtime import autocast


def step_lr_factor(epoch: float, milestones: list[int], gamma: float, warmup_epochs: float) -> float:
    """LR multiplier at fractional `epoch`: gamma per milestone passed, times a linear warm-up in the first epochs."""
    decay = gamma ** sum(epoch >= m for m in milestones)
    return decay * min(1.0, (epoch + 1e-9) / warmup_epochs) if warmup_epochs else decay


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: Iterable, device: torch.device, precision: str) -> dict[str, float]:
    """top-1 and top-5 (%) of `model` (returning {"logits": ...}) over `loader`."""
    model.eval()
    hits, seen = torch.zeros(2), 0
    for images, targets, _ in loader:
        if not len(targets):
            continue
        with autocast(device, precision):
            logits = model(images.to(device))["logits"]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        right = top == targets[:, None]
        hits += torch.stack([right[:, :1].any(1).sum(), right.any(1).sum()]).float()
        seen += len(targets)
    return {"top1": round(100.0 * float(hits[0]) / seen, 3), "top5": round(100.0 * float(hits[1]) / seen, 3)}


def run_settings(config: ClsConfig) -> RunSettings:
    train = config.train
    return RunSettings(output_dir=Path(train.output_dir), device=train.device, seed=train.seed, epochs=train.epochs,
                       batch_size=train.batch_size, precision=train.precision, log_every_steps=train.log_every_steps,
                       max_nonfinite_steps=train.max_nonfinite_steps, accum_steps=config.optim.accum_steps,
                       max_bad_fraction=config.data.max_bad_fraction, data_name="data (training split)")


class ClassificationTask(Task):
    """A CNN student (alone or distilled from a CNN teacher) on an image classification data set; best.pt and
    last.pt after each epoch in the CRD layout, validation accuracy on rank 0."""

    model_role, weights_files = "student", "a student-only best.pt / last.pt"

    def __init__(self, config: ClsConfig) -> None:
        check_cls_config(config)
        self.config, self.model_name = config, config.model.student
        self.best_top1 = -1.0

    def build(self, device: torch.device, dist: DistInfo) -> torch.nn.Module:
        from clipkd_dino.classify.distillers import DISTILLERS, build_distiller
        from clipkd_dino.models.cnn import create_classifier

        config, self.device, self.dist = self.config, device, dist
        self.data = build_data(config.data.dataset, config.data.root, config.data.train_limit, config.train.seed)
        self.student = create_classifier(config.model.student, self.data.num_classes)
        uses_teacher = DISTILLERS[config.distill.method].uses_teacher or config.distill.dino_weight > 0
        teacher = load_teacher(config, self.data.num_classes, device) if uses_teacher else None
        class_means = (read_centers(config.distill.class_means, self.data.num_classes, teacher.feature_dim)
                       if config.distill.dino_weight > 0 else None)
        self.distiller = build_distiller(config.distill, self.student, teacher, class_means).to(device)
        return self.distiller

    def prepare(self) -> None:
        self.sampler = DistributedSampler(self.data.train, self.dist.world_size, self.dist.rank, shuffle=True,
                                          seed=self.config.train.seed, drop_last=True)
        if len(self.sampler) < self.config.train.batch_size:
            raise ConfigError(f"train.batch_size={self.config.train.batch_size} is more than the "
                              f"{len(self.sampler)} training images of one process")

    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.config.train.batch_size

    def skipped_at_start(self) -> Counter:
        return Counter(self.data.skipped_at_load)  # in-memory data sets drop their bad samples once, while loading

    def optimizer(self) -> torch.optim.Optimizer:
        optim = self.config.optim
        return torch.optim.SGD(self.distiller.parameters(), lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int):
        optim = self.config.optim
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step_lr_factor(
            step / steps_per_epoch, optim.milestones, optim.gamma, optim.lr_warmup_epochs))

    def _loader(self, dataset, sampler=None, epoch: int = 0) -> Iterator:
        """The batches of `dataset` through the one loader factory (a stuck worker is an error, not a hang); each
        rank's workers draw their own augmentations."""
        loader = data_loader(dataset, workers=self.config.data.workers, batch_size=self.config.train.batch_size,
                             sampler=sampler, drop_last=sampler is not None, collate_fn=collate_classification,
                             seed=self.config.train.seed * 1_000_003 + epoch + (self.dist.rank << 32))
        return loader_batches(loader, "the data loader's timeout")

    def epoch_batches(self, epoch: int, skip: int, cursors: dict[int, dict]) -> Iterator[dict]:
        """{"images", "targets", "skipped", "progress": the fractional epoch the distiller's warm-ups read}."""
        self.sampler.set_epoch(epoch)
        sampler = SkipFirst(self.sampler, skip * self.config.train.batch_size)
        per_epoch, batches = self.batches_per_epoch(), self._loader(self.data.train, sampler, epoch)
        try:
            for index, (images, targets, skipped) in enumerate(batches, skip):
                yield {"images": images, "targets": targets, "skipped": skipped, "progress": epoch + index / per_epoch}
        finally:
            batches.close()  # its loader workers stop with the epoch

    def forward(self, wrapped: torch.nn.Module, batch: dict, accumulated: list[dict] | None,
                index: int) -> dict[str, torch.Tensor]:
        return wrapped(batch["images"], batch["targets"], batch["progress"])[1]

    def fingerprint(self) -> dict[str, Any]:
        config = self.config
        return {"data.dataset": config.data.dataset, "data.root": config.data.root,
                "data.train_limit": config.data.train_limit, "train.batch_size": config.train.batch_size,
                "train.seed": config.train.seed, "processes": self.dist.world_size}

    def state(self) -> dict[str, Any]:
        return {"best_top1": self.best_top1}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best_top1 = state["best_top1"]

    def end_epoch(self, run: Engine) -> dict[str, float]:
        """Validation accuracy on rank 0 (exact: every image once), shared with all ranks; last.pt, best.pt when
        it improved, then latest.pt."""
        metrics = {"top1": 0.0, "top5": 0.0}
        if self.dist.is_main:
            metrics = accuracy(self.student, self._loader(self.data.val), self.device, self.config.train.precision)
        if self.dist.enabled:
            shared = torch.tensor([metrics["top1"], metrics["top5"]], device=self.device)
            torch.distributed.broadcast(shared, src=0)
            metrics = {"top1": float(shared[0]), "top5": float(shared[1])}
        improved = metrics["top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, metrics["top1"])
        epoch, step = run.position.epoch, run.position.step
        run.log.metrics({"epoch": epoch, "step": step, **metrics, "best_top1": self.best_top1})
        if self.dist.is_main:
            tqdm.write(f"[epoch {epoch}] top1={metrics['top1']:.2f} top5={metrics['top5']:.2f} "
                       f"best={self.best_top1:.2f}")
            for name in ("last.pt", "best.pt") if improved else ("last.pt",):
                self._save_student(run.output_dir / "checkpoints" / name, epoch, metrics)
        run.save_latest()
        return metrics

    def _save_student(self, path: Path, epoch: int, metrics: dict[str, float]) -> None:
        weights = self.distiller.student_state_dict()
        save_checkpoint({"model": weights, "model_name": self.config.model.student,
                         "num_classes": self.data.num_classes, "epoch": epoch, **metrics}, path, weights)

    def summary(self, common: dict[str, Any], run: Engine, metrics: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        return {
            "student": config.model.student, "teacher": config.model.teacher,
            "method": config.distill.method, "dino_weight": config.distill.dino_weight,
            "epochs": run.position.epoch, "steps": common.pop("steps"), "processes": common.pop("processes"),
            "wall_seconds": common.pop("wall_seconds"), "last": metrics, "best_top1": self.best_top1,
            "published_top1": config.published.top1, **common,
            "checkpoint": str(run.output_dir / "checkpoints" / "best.pt"),
        }


class ClsTrainer(Engine):
    """The engine running a `ClassificationTask`."""

    def __init__(self, config: ClsConfig, resume: str | None = None) -> None:
        super().__init__(ClassificationTask(config), run_settings(config), resume)


def train_classifier(config: ClsConfig, resume: str | None = None) -> dict[str, Any]:
    """Train a CNN student as `config` says; returns the run summary."""
    return ClsTrainer(config, resume).run()
