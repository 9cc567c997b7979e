"""`clipkd cls train`: SGD with a step schedule for CNN students (KD, DKD, ReviewKD and their ++ variants).

Outputs in `train.output_dir`:
  config.yaml               the resolved configuration
  checkpoints/latest.pt     everything a resumed run needs (student + distiller extras, optimiser, RNG, best so far)
  checkpoints/best.pt       the student with the best validation top-1: {"model": state_dict, ...} (the CRD layout,
  checkpoints/last.pt       so a trained student can teach in turn); no projector, no ABF, no optimiser
  log.jsonl, metrics.jsonl, tensorboard/, summary.json

`latest.pt` is written after every epoch and when a SIGTERM / SIGINT stops the run (at the next step). A resumed run
continues at the saved batch: the epoch's order is a function of (seed, epoch) and the RNG is restored, so with
`data.workers: 0` a resumed run on CPU ends with the weights of one that was never stopped (with worker processes,
the augmentations of the resumed epoch's remaining batches are drawn anew). Steps with a non-finite loss are
skipped (`train.max_nonfinite_steps` in a row stop the run); one run per output folder (a lock).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from clipkd_dino.classify.centers import load_teacher, read_centers
from clipkd_dino.classify.config import ClsConfig, check_cls_config
from clipkd_dino.classify.data import build_data, collate_classification
from clipkd_dino.config import config_to_dict
from clipkd_dino.errors import ConfigError
from clipkd_dino.files import write_json_atomic
from clipkd_dino.runtime import autocast
from clipkd_dino.data.loader import batches as loader_batches
from clipkd_dino.data.loader import data_loader
from clipkd_dino.data.pairs import SkipFirst
from clipkd_dino.engine.checkpoint import load_checkpoint, resolve_resume
from clipkd_dino.engine.distributed import (check_shared_folder, global_min, init_process, shutdown_distributed,
                                           summed_counts)
from clipkd_dino.engine.guard import (NonFiniteGuard, OutputLock, StopSignals, save_checkpoint,
                                     stop_on_bad_fraction)
from clipkd_dino.engine.runlog import RunLog


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


class ClsTrainer:
    def __init__(self, config: ClsConfig, resume: str | None = None) -> None:
        from clipkd_dino.classify.distillers import build_distiller
        from clipkd_dino.models.cnn import create_classifier

        check_cls_config(config)
        self.config = config
        self.output_dir = Path(config.train.output_dir)
        resume_path = resolve_resume(resume, self.output_dir) if resume else None
        self.device, self.dist = init_process(config.train.device)
        check_shared_folder(self.output_dir, "train.output_dir")
        device = self.device
        self.lock = OutputLock(self.output_dir) if self.dist.is_main else None
        torch.manual_seed(config.train.seed)

        data = build_data(config.data.dataset, config.data.root, config.data.train_limit, config.train.seed)
        self.num_classes = data.num_classes
        self.student = create_classifier(config.model.student, data.num_classes)
        uses_teacher = config.distill.method != "vanilla" or config.distill.dino_weight > 0
        teacher = load_teacher(config, data.num_classes, device) if uses_teacher else None
        class_means = (read_centers(config.distill.class_means, data.num_classes, teacher.feature_dim)
                       if config.distill.dino_weight > 0 else None)
        self.distiller = build_distiller(config.distill, self.student, teacher, class_means).to(device)
        self.wrapped = (
            DistributedDataParallel(self.distiller, device_ids=[device.index] if device.type == "cuda" else None)
            if self.dist.enabled else self.distiller
        )
        self.sampler = DistributedSampler(data.train, self.dist.world_size, self.dist.rank, shuffle=True,
                                          seed=config.train.seed, drop_last=True)
        self.train_data, self.val_data = data.train, data.val
        self.steps_per_epoch = len(self.sampler) // config.train.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={config.train.batch_size} is more than the {len(self.sampler)} "
                              "training images of one process")
        optim = config.optim
        self.optimizer = torch.optim.SGD(self.distiller.parameters(), lr=optim.lr, momentum=optim.momentum,
                                         weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: step_lr_factor(
            step / self.steps_per_epoch, optim.milestones, optim.gamma, optim.lr_warmup_epochs))
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
        self.epoch, self.batch, self.step, self.best_top1 = 0, 0, 0, -1.0
        self.skipped: Counter = Counter()
        self.seen = 0  # training images read, good and bad
        self.nonfinite, self.signals = NonFiniteGuard(config.train.max_nonfinite_steps), StopSignals()
        if resume_path:
            self._restore(load_checkpoint(resume_path))
        elif self.dist.is_main:  # in-memory data sets drop their bad samples once, while loading
            self.skipped.update(data.skipped_at_load)
            self.seen += sum(data.skipped_at_load.values())
        self.log = RunLog(self.output_dir, self.dist.is_main)
        if self.dist.is_main:
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    def run(self) -> dict[str, Any]:
        start, metrics = time.time(), {}
        try:
            with self.signals:
                while self.epoch < self.config.train.epochs:
                    self._train_epoch()
                    stop_on_bad_fraction(self.skipped, self.seen, self.config.data.max_bad_fraction,
                                         "data (training split)", self.device, final=True)  # the end of a pass
                    self.epoch, self.batch = self.epoch + 1, 0
                    metrics = self._evaluate()
            summary = {
                "student": self.config.model.student, "teacher": self.config.model.teacher,
                "method": self.config.distill.method, "dino_weight": self.config.distill.dino_weight,
                "epochs": self.epoch, "steps": self.step, "processes": self.dist.world_size,
                "wall_seconds": round(time.time() - start, 1), "last": metrics, "best_top1": self.best_top1,
                "published_top1": self.config.published.top1, "nonfinite_steps": self.nonfinite.total,
                "skipped_samples": summed_counts(self.skipped),
                "seen_samples": summed_counts({"seen": self.seen}).get("seen", 0),
                "checkpoint": str(self.output_dir / "checkpoints" / "best.pt"),
            }
            if self.dist.is_main:
                write_json_atomic(self.output_dir / "summary.json", summary)
            return summary
        finally:
            self.log.close()
            if self.lock:
                self.lock.release()
            shutdown_distributed()

    def _loader(self, dataset, sampler=None, epoch: int = 0) -> Iterator:
        """The batches of `dataset` through the one loader factory (a stuck worker is an error, not a hang)."""
        loader = data_loader(dataset, workers=self.config.data.workers, batch_size=self.config.train.batch_size,
                             sampler=sampler, drop_last=sampler is not None, collate_fn=collate_classification,
                             seed=self.config.train.seed * 1_000_003 + epoch)
        return loader_batches(loader, "the data loader's timeout")

    def _train_epoch(self) -> None:
        cfg = self.config
        self.sampler.set_epoch(self.epoch)
        self.wrapped.train()
        sampler = SkipFirst(self.sampler, self.batch * cfg.train.batch_size)
        progress = tqdm(self._loader(self.train_data, sampler, self.epoch), total=self.steps_per_epoch,
                        initial=self.batch, disable=not self.dist.is_main,
                        desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", unit="batch", dynamic_ncols=True)
        try:
            for images, targets, skipped in progress:
                self.skipped.update(skipped)
                self.seen += len(targets) + sum(skipped.values())
                stop_on_bad_fraction(self.skipped, self.seen, cfg.data.max_bad_fraction, "data (training split)",
                                     self.device)
                if global_min(len(targets), self.device) == 0:  # a batch with no readable image on some process
                    self.batch += 1
                    continue
                images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
                with autocast(self.device, cfg.train.precision):
                    _, named = self.wrapped(images, targets, self.epoch + self.batch / self.steps_per_epoch)
                skip = self.nonfinite.bad_terms(named, self.device)
                if skip:
                    self.optimizer.step()  # no gradients: updates nothing, keeps the scheduler's order
                else:
                    loss = sum(named.values())
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.step, self.batch = self.step + 1, self.batch + 1
                if not skip and (self.step == 1 or self.step % cfg.train.log_every_steps == 0):
                    values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in named.items()}}
                    self.log.train({"step": self.step, "epoch": self.epoch, **values, "lr": lr})
                    progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                if self.signals.requested(self.device):
                    latest = self._save_latest()
                    raise self.signals.stopped(f"at step {self.step} (epoch {self.epoch + 1}, batch {self.batch})",
                                               f"saved {latest}")
        finally:
            progress.close()  # also on an error, so that its message starts a line of its own

    def _evaluate(self) -> dict[str, float]:
        """Validation accuracy on rank 0 (exact: every image once), shared with all ranks; then the checkpoints."""
        metrics = {"top1": 0.0, "top5": 0.0}
        if self.dist.is_main:
            metrics = accuracy(self.student, self._loader(self.val_data), self.device, self.config.train.precision)
        if self.dist.enabled:
            shared = torch.tensor([metrics["top1"], metrics["top5"]], device=self.device)
            torch.distributed.broadcast(shared, src=0)
            metrics = {"top1": float(shared[0]), "top5": float(shared[1])}
        improved = metrics["top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, metrics["top1"])
        self.log.metrics({"epoch": self.epoch, "step": self.step, **metrics, "best_top1": self.best_top1})
        if self.dist.is_main:
            tqdm.write(f"[epoch {self.epoch}] top1={metrics['top1']:.2f} top5={metrics['top5']:.2f} "
                       f"best={self.best_top1:.2f}")
            self._save_student("last.pt", metrics)
            if improved:
                self._save_student("best.pt", metrics)
            self._save_latest()
        return metrics

    def _save_student(self, name: str, metrics: dict[str, float]) -> None:
        weights = self.distiller.student_state_dict()
        save_checkpoint({"model": weights, "model_name": self.config.model.student, "num_classes": self.num_classes,
                         "epoch": self.epoch, **metrics}, self.output_dir / "checkpoints" / name, weights)

    def _save_latest(self) -> Path:
        path, weights = self.output_dir / "checkpoints" / "latest.pt", self.distiller.state_dict()
        if self.dist.is_main:
            save_checkpoint({"distiller": weights, "optimizer": self.optimizer.state_dict(),
                             "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                             "epoch": self.epoch, "batch_in_epoch": self.batch, "step": self.step,
                             "best_top1": self.best_top1, "model_name": self.config.model.student,
                             "skipped": dict(self.skipped), "seen": self.seen, "rng": torch.get_rng_state()},
                            path, weights)
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        if "optimizer" not in state:
            raise ConfigError("--resume needs checkpoints/latest.pt, not a student-only best.pt / last.pt")
        if state["model_name"] != self.config.model.student:
            raise ConfigError(f"--resume: the checkpoint's student is {state['model_name']!r}, the config says "
                              f"{self.config.model.student!r}")
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best_top1 = state["best_top1"]
        self.skipped.update(state["skipped"])
        self.seen = state["seen"]
        if self.dist.is_main:
            print(f"resuming at step {self.step} (epoch {self.epoch + 1}, batch {self.batch})", file=sys.stderr,
                  flush=True)


def train_classifier(config: ClsConfig, resume: str | None = None) -> dict[str, Any]:
    """Train a CNN student as `config` says; returns the run summary."""
    return ClsTrainer(config, resume).run()
