"""The one training loop, for every training mode: a `Task` says what is trained on what, the `Engine` runs it.

The engine owns the process group and the output folder (shared-folder check, lock, config.yaml, logs), per-rank
random streams (every rank builds identical weights from `seed`, then draws dropout and masks from
`seed + RANK_SEED_STRIDE x rank`), the DDP wrap, the step (micro-batches, autocast, GradScaler, clipping, the
non-finite loss/gradient guard and one host synchronisation per step), stop signals, and `latest.pt`: optimiser,
scheduler, scaler, position, every rank's CPU and CUDA generators and loader cursors, the stream fingerprint, and
what the task adds (`Task.state`), for `--resume latest|auto [--new-stream]`.

The objective a task builds tells the engine which of its named losses are batch-wide (`objective.batch_wide`:
under accumulation they are computed over the whole step, not divided by the micro-batch count; such an objective
has `embed(batch)` and `forward(batch, accumulated, index)`) and whether every parameter gets a gradient at every
step (`objective.uses_every_parameter`: DDP looks for unused ones otherwise).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from clipkd_dino.config import config_to_dict
from clipkd_dino.data.faults import bad_fraction_exceeded
from clipkd_dino.engine.checkpoint import load_checkpoint, resolve_resume
from clipkd_dino.engine.distributed import (SHARED_FOLDER_TIMEOUT, DistInfo, check_shared_folder, gathered_objects,
                                           gathered_tensors, init_process, known_batch_sizes, shutdown_distributed,
                                           summed_counts)
from clipkd_dino.engine.guard import NonFiniteGuard, OutputLock, StopSignals, save_checkpoint, stop_on_bad_fraction
from clipkd_dino.engine.runlog import RunLog
from clipkd_dino.errors import ConfigError
from clipkd_dino.files import write_json_atomic
from clipkd_dino.runtime import autocast

CHECKPOINT_NAME = "latest.pt"
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 draws dropout and masks from seed + r x this


@dataclass(frozen=True)
class RunSettings:
    """What the engine reads from a mode's config."""

    output_dir: Path
    device: str
    seed: int
    epochs: int
    batch_size: int  # per process and micro-batch
    precision: str
    log_every_steps: int
    max_nonfinite_steps: int
    accum_steps: int = 1
    grad_clip: float | None = None
    checkpoint_every_steps: int = 0  # also save latest.pt every N steps (0: at epoch ends only)
    max_bad_fraction: float | None = None
    data_name: str = "data.train"  # how the bad-fraction stop names the training data
    shared_folder_timeout: float = SHARED_FOLDER_TIMEOUT


@dataclass(frozen=True)
class Agreed:
    """What every process learns at a step's exchange: the step had a non-finite loss or gradient somewhere; some
    process was signalled to stop; some process read more than max_bad_fraction bad data; sizes[m][r] = the size of
    micro-batch m of the next step on process r."""

    nonfinite: bool
    stop: bool
    bad_data: bool
    sizes: list[list[int]]


@dataclass
class Position:
    """Where training stands: `batch` micro-batches done in `epoch` (0-based), `step` optimiser steps in all."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


class Task:
    """What a training mode supplies. A batch is a dict with "images" (its samples, first dimension), "skipped"
    (a Counter of the samples dropped as bad) and optionally "cursor" (where its data stream stands)."""

    config: Any  # the mode's config dataclass, written to config.yaml and into checkpoints
    model_name: str  # saved in latest.pt; a resume of another model is refused
    model_role: str = "model"  # what the model is called in that refusal
    weights_files: str = "a file of weights only"  # the task's other checkpoints, which cannot be resumed from
    min_micro_batch: int = 1  # a micro-batch with fewer samples on some process is not trained (underfull)

    def build(self, device: torch.device, dist: DistInfo) -> torch.nn.Module:
        """The objective (a module returning named losses): called under the shared seed, so identical weights."""
        raise NotImplementedError

    def prepare(self) -> None:
        """What comes after the per-rank seed: the data, evaluation sets, compilation."""

    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def skipped_at_start(self) -> Counter:
        """Bad samples dropped before training (counted once, by rank 0, on a fresh start)."""
        return Counter()

    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        raise NotImplementedError

    def epoch_batches(self, epoch: int, skip: int, cursors: dict[int, dict]) -> Iterator[dict]:
        """The micro-batches of `epoch` after the first `skip`, continuing the given loader cursors."""
        raise NotImplementedError

    def batch_size(self, batch: dict) -> int:
        return len(batch["images"])

    def to_device(self, batch: dict, device: torch.device) -> dict:
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward(self, wrapped: torch.nn.Module, batch: dict, accumulated: list[dict] | None,
                index: int) -> dict[str, torch.Tensor]:
        """The named losses of one micro-batch (`accumulated`: every micro-batch's embeddings, see the module)."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """E.g. clamp a parameter the optimiser may have pushed out of range."""

    def log_fields(self) -> dict[str, float]:
        """Extra numbers for a log.jsonl line."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """What the data stream of a run is (a resume on another is refused without --new-stream)."""
        raise NotImplementedError

    def check_resume(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of weights only, or of another model (ConfigError)."""
        if "optimizer" not in state:
            raise ConfigError(f"--resume needs a full checkpoint (checkpoints/latest.pt), not {self.weights_files}")
        if state["model_name"] != self.model_name:
            raise ConfigError(f"--resume: the checkpoint's {self.model_role} is {state['model_name']!r}, the config "
                              f"says {self.model_name!r}")

    def state(self) -> dict[str, Any]:
        """What the task adds to latest.pt."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back what `state` added."""

    def end_epoch(self, run: Engine) -> dict[str, Any]:
        """After epoch `run.position.epoch` (1-based now): its checkpoints and evaluation, in the task's order,
        with one call of `run.save_latest()` (a collective, on every rank). Returns the evaluation's metrics ({}:
        none this epoch)."""
        raise NotImplementedError

    def summary(self, common: dict[str, Any], run: Engine, metrics: dict[str, Any]) -> dict[str, Any]:
        """summary.json: the engine's `common` fields with the task's."""
        raise NotImplementedError


def random_state(device: torch.device) -> dict[str, Any]:
    """This process's CPU generator and, on CUDA, its device's generator."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_random_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def stream_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between the stream a checkpoint was saved on and this run's, as `key: saved -> now`."""
    if saved is None:
        return ["the checkpoint predates stream fingerprints"]
    return [f"{key}: {saved.get(key)} -> {current.get(key)}" for key in dict.fromkeys([*saved, *current])
            if saved.get(key) != current.get(key)]


class Engine:
    """Runs `task` as `settings` say; `resume`: 'latest', 'auto' or a latest.pt path; `new_stream`: a resume may
    continue on a data stream other than the saved one (see `_restore`)."""

    def __init__(self, task: Task, settings: RunSettings, resume: str | None = None,
                 new_stream: bool = False) -> None:
        self.task, self.settings, self.new_stream = task, settings, new_stream
        self.output_dir = Path(settings.output_dir)
        resume_path = resolve_resume(resume, self.output_dir) if resume else None
        self.device, self.dist = init_process(settings.device)
        check_shared_folder(self.output_dir, "train.output_dir", settings.shared_folder_timeout)
        torch.manual_seed(settings.seed)
        self.objective = task.build(self.device, self.dist)
        if self.dist.rank:  # the same weights everywhere (DDP broadcasts them anyway), a random stream per rank
            torch.manual_seed(settings.seed + RANK_SEED_STRIDE * self.dist.rank)
        task.prepare()
        self.wrapped = (
            DistributedDataParallel(self.objective,
                                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                    find_unused_parameters=not self.objective.uses_every_parameter)
            if self.dist.enabled else self.objective
        )
        accum = settings.accum_steps
        self.steps_per_epoch = task.batches_per_epoch() // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"optim.accum_steps={accum} is more than the {task.batches_per_epoch()} batches "
                              "of an epoch")
        self.batches_per_epoch = self.steps_per_epoch * accum  # the micro-batches trained (a remainder is not)
        self.stream = task.fingerprint() | {"optim.accum_steps": accum}
        self.optimizer = task.optimizer()
        self.scheduler = task.scheduler(self.optimizer, self.steps_per_epoch, settings.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        self.position = Position()
        self.skipped: Counter = Counter()
        self.seen = 0  # samples read, good and bad (the max_bad_fraction denominator)
        self.underfull = 0  # micro-batches not trained: too few readable samples on some process
        self.nonfinite = NonFiniteGuard(settings.max_nonfinite_steps)
        self.cursors: dict[int, dict] = {}  # data stream -> the cursor of its last batch done this epoch
        self.random_at_position: dict[str, Any] | None = None  # within an epoch: the generators as they were
        # before the pending micro-batches were read (main-process augmentations draw from them)
        self.signals = StopSignals()
        if resume_path:
            self._restore(load_checkpoint(resume_path))
        elif self.dist.is_main:
            self.skipped.update(task.skipped_at_start())
            self.seen += sum(task.skipped_at_start().values())
        self.lock = OutputLock(self.output_dir) if self.dist.is_main else None  # taken once nothing can fail
        self.log = RunLog(self.output_dir, self.dist.is_main)
        if self.dist.is_main:
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(task.config),
                                                                        sort_keys=False))

    @property
    def latest_path(self) -> Path:
        return self.output_dir / "checkpoints" / CHECKPOINT_NAME

    # ----------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train to the last epoch; returns the summary (also summary.json)."""
        start = time.time()
        try:
            with self.signals:
                metrics = self._epochs()
            common = {
                "steps": self.position.step,
                "processes": self.dist.world_size,
                "wall_seconds": round(time.time() - start, 1),
                "skipped_samples": summed_counts(self.skipped),
                "seen_samples": summed_counts({"seen": self.seen}).get("seen", 0),  # over every process
                "underfull_batches": self.underfull,  # the same on every process (they agree on each batch)
                "nonfinite_steps": self.nonfinite.total,
            }
            summary = self.task.summary(common, self, metrics)
            if self.dist.is_main:
                write_json_atomic(self.output_dir / "summary.json", summary)
            return summary
        finally:
            self.log.close()
            if self.lock:
                self.lock.release()
            shutdown_distributed()

    def _epochs(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        while self.position.epoch < self.settings.epochs:
            self._train_epoch()
            stop_on_bad_fraction(self.skipped, self.seen, self.settings.max_bad_fraction, self.settings.data_name,
                                 self.device, final=True)  # the end of a pass: judged whatever was seen
            self.position = Position(self.position.epoch + 1, 0, self.position.step)
            self.cursors = {}
            metrics = self.task.end_epoch(self)
        return metrics

    def _train_epoch(self) -> None:
        """One epoch, one host synchronisation per optimiser step outside logging steps: the micro-batches of the
        next step are fetched before the step ends, and a single exchange (`_agree`) tells every process whether
        the step was finite, whether any process was signalled or read too much bad data, and the sizes of the next
        step's micro-batches on every process (for the underfull check and the feature gathers)."""
        settings, pos = self.settings, self.position
        accum = settings.accum_steps
        total = self.steps_per_epoch * accum
        batches = self.task.epoch_batches(pos.epoch, pos.batch, self.cursors)
        progress = tqdm(total=total, initial=pos.batch, disable=not self.dist.is_main,
                        desc=f"epoch {pos.epoch + 1}/{settings.epochs}", unit="batch", dynamic_ncols=True)
        window = {"start": time.perf_counter(), "samples": 0, "waited": 0.0}
        self.wrapped.train()
        try:
            pending = self._fetch(batches, min(accum, total - pos.batch), window)
            agreed = self._agree(None, pending)
            while pending:
                losses = self._train_step(pending, agreed.sizes, window, progress)
                self.random_at_position = random_state(self.device)
                pending = self._fetch(batches, min(accum, total - pos.batch), window)
                norm = self._gradient_norm()
                agreed = self._agree(torch.isfinite(sum(losses.values(), norm)).logical_not(), pending)
                if agreed.bad_data:
                    stop_on_bad_fraction(self.skipped, self.seen, settings.max_bad_fraction, settings.data_name,
                                         self.device)
                self.nonfinite.check(agreed.nonfinite, losses, norm)  # raises after a streak
                lr = self._optimizer_step(skip=agreed.nonfinite)
                if losses and not agreed.nonfinite and (pos.step == 1 or pos.step % settings.log_every_steps == 0):
                    self._log_window(losses, norm, lr, window, progress)
                every = settings.checkpoint_every_steps
                if (every and pos.step % every == 0) or agreed.stop:
                    self.save_latest()
                if agreed.stop:
                    raise self.signals.stopped(f"at step {pos.step} (epoch {pos.epoch + 1}, batch {pos.batch})",
                                               f"saved {self.latest_path}")
        finally:
            progress.close()  # also on an error, so that its message starts a line of its own
            batches.close()  # its loader workers stop now, not whenever the generator is collected
            self.random_at_position = None
        self.optimizer.zero_grad(set_to_none=True)

    def _fetch(self, batches: Iterator[dict], count: int, window: dict) -> list[dict]:
        """Up to `count` next micro-batches; the time spent waiting for them goes to the log window."""
        start = time.perf_counter()
        fetched = list(itertools.islice(batches, max(count, 0)))
        window["waited"] += time.perf_counter() - start
        return fetched

    def _agree(self, nonfinite: torch.Tensor | None, upcoming: list[dict]) -> Agreed:
        """The one exchange of a step: this process's flags (non-finite step, stop signal, bad-data stop) and the
        sizes of its upcoming micro-batches, all-gathered in one small tensor and read once on the host."""
        accum = self.settings.accum_steps
        local = torch.full((3 + accum,), -1.0, device=self.device)
        local[0] = nonfinite.float() if nonfinite is not None else 0.0
        local[1] = float(self.signals.received is not None)
        local[2] = float(bad_fraction_exceeded(self.skipped, self.seen, self.settings.max_bad_fraction))
        local[3:3 + len(upcoming)] = torch.tensor([float(self.task.batch_size(b)) for b in upcoming])
        rows = torch.stack(gathered_tensors(local)).tolist()  # the step's one host synchronisation
        sizes = [[int(row[3 + m]) for row in rows] for m in range(len(upcoming))]
        return Agreed(any(row[0] > 0 for row in rows), any(row[1] > 0 for row in rows),
                      any(row[2] > 0 for row in rows), sizes)

    def _train_step(self, micro_batches: list[dict], sizes: list[list[int]], window: dict,
                    progress: tqdm) -> dict[str, torch.Tensor]:
        """Forward and backward of a step's micro-batches; returns the step's named losses, on the device."""
        accum = self.settings.accum_steps
        least = min(self.task.min_micro_batch, self.settings.batch_size)
        trained = [m for m, per_rank in enumerate(sizes) if min(per_rank) >= least]
        for batch in micro_batches:
            if "cursor" in batch:
                cursor = batch.pop("cursor")
                self.cursors[cursor["stream"]] = cursor
            self.skipped.update(batch["skipped"])
            self.seen += self.task.batch_size(batch) + sum(batch["skipped"].values())
        self.underfull += len(micro_batches) - len(trained)
        batches = [self.task.to_device(micro_batches[m], self.device) for m in trained]
        accumulated, whole = None, None
        if len(batches) > 1 and self.objective.batch_wide:  # batch-wide terms see every micro-batch: their
            with torch.no_grad(), autocast(self.device, self.settings.precision):  # embeddings first, no gradient
                accumulated = [self.objective.embed(batch) for batch in batches]
            whole = [sum(sizes[m][rank] for m in trained) for rank in range(self.dist.world_size)]
        losses: dict[str, torch.Tensor] = {}
        for index, (micro, batch) in enumerate(zip(trained, batches)):
            window["samples"] += sum(sizes[micro])
            with known_batch_sizes(whole or sizes[micro]):
                named = self._forward_backward(batch, index == len(batches) - 1, accumulated, index)
            for name, value in named.items():
                losses[name] = losses.get(name, 0.0) + value.detach() / accum
        self.position.batch += len(micro_batches)
        progress.update(len(micro_batches))
        return losses

    def _forward_backward(self, batch: dict, sync: bool, accumulated: list[dict] | None,
                          index: int) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch (the package's one `.backward()`). Under accumulation each
        micro-batch's pass carries the whole of the batch-wide losses (only its own embeddings have a gradient, so
        the passes sum to the whole batch's gradient) and a 1/k share of the per-sample terms."""
        no_sync = self.wrapped.no_sync if self.dist.enabled and not sync else contextlib.nullcontext
        accum, batch_wide = self.settings.accum_steps, self.objective.batch_wide
        with no_sync():
            with autocast(self.device, self.settings.precision):
                named = self.task.forward(self.wrapped, batch, accumulated, index)
            whole = sum(v for k, v in named.items() if k in batch_wide)
            per_sample = sum(v for k, v in named.items() if k not in batch_wide)
            self.scaler.scale((whole if accumulated else whole / accum) + per_sample / accum).backward()
        return {"loss": sum(named.values()), **named}

    def _gradient_norm(self) -> torch.Tensor:
        """The global gradient norm (a device tensor; unscaled first under fp16), clipped to `grad_clip`."""
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.settings.grad_clip or math.inf)

    def _optimizer_step(self, skip: bool) -> float:
        """The optimiser and scheduler step; with `skip` (a non-finite loss or gradient on some process) the
        gradients are dropped and the weights stay as they were."""
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()  # no gradients: updates nothing, keeps the optimiser's step count in line
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.task.after_optimizer_step()
        self.position.step += 1
        return lr

    # ------------------------------------------------------------------------------------ outputs and state
    def _log_window(self, losses: dict[str, torch.Tensor], norm: torch.Tensor, lr: float, window: dict,
                    progress: tqdm) -> None:
        """A log.jsonl line and TensorBoard scalars: losses, gradient norm, lr, samples/s (all processes), the share
        of the window's wall time spent waiting for data (high: the loader starves the step), the task's fields,
        the peak GPU memory."""
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        rate, wait = window["samples"] / elapsed, window["waited"] / elapsed
        values = {name: float(value) for name, value in losses.items()}
        record = {"step": self.position.step, "epoch": self.position.epoch, **values, "grad_norm": float(norm),
                  "lr": lr, "samples_per_s": rate, "data_wait": round(wait, 4), **self.task.log_fields()}
        if self.device.type == "cuda":
            record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.log.train(record)
        progress.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}",
                             data_wait=f"{wait:.0%}", skipped=sum(self.skipped.values()))
        window.update(start=time.perf_counter(), samples=0, waited=0.0)

    def save_latest(self) -> Path:
        """latest.pt, with every rank's data streams and random generators at the saved position (a collective:
        every rank saves at the same steps)."""
        rng = gathered_objects(self.random_at_position or random_state(self.device))
        cursors = gathered_objects(self.cursors)
        if self.dist.is_main:
            weights = self.objective.state_dict()
            payload = {
                "model_name": self.task.model_name,
                "epoch": self.position.epoch,
                "batch_in_epoch": self.position.batch,
                "step": self.position.step,
                "batches_per_epoch": self.batches_per_epoch,
                "objective": weights,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "skipped": dict(self.skipped),
                "seen": self.seen,
                "underfull": self.underfull,
                "rng": rng,  # per rank: dropout and masks continue as if never stopped
                "data_cursors": cursors,  # per rank: where each data stream of the epoch stands
                "stream": self.stream,  # what the cursors and the position in the epoch refer to
            } | self.task.state()
            save_checkpoint(payload, self.latest_path, weights)
        return self.latest_path

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from latest.pt. On the stream it was saved on (its fingerprint equal), exactly: every rank's
        generators and loader cursors. On another stream only with `new_stream`: the epoch goes on from the same
        share of its batches, each rank keeping its freshly seeded generators."""
        self.task.check_resume(state)
        changed = stream_changes(state.get("stream"), self.stream)
        if changed and not self.new_stream:
            raise ConfigError(f"--resume: this run's data stream is not the one {CHECKPOINT_NAME} was saved on "
                              f"({'; '.join(changed)}): resume with the saved settings, or add --new-stream to run "
                              "the epoch's remaining steps on the new stream")
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.task.load_state(state)
        self.skipped.update(state["skipped"])
        self.seen, self.underfull = state.get("seen", 0), state.get("underfull", 0)
        accum = self.settings.accum_steps
        if changed:  # each rank keeps its freshly seeded generator; the epoch goes on in proportion
            done = min(state["batch_in_epoch"] / (state.get("batches_per_epoch") or self.batches_per_epoch), 1.0)
            batch = round(done * self.steps_per_epoch) * accum
        else:
            set_random_state(state["rng"][self.dist.rank], self.device)
            self.cursors, batch = state["data_cursors"][self.dist.rank], state["batch_in_epoch"]
        self.position = Position(state["epoch"], batch, state["step"])
        if self.dist.is_main:
            new = (f" on a new data stream ({'; '.join(changed)}): the epoch's remaining "
                   f"{self.steps_per_epoch - batch // accum} steps read the new stream "
                   "from the same share of the epoch, so some of its samples may be seen twice or not at all this "
                   "epoch") if changed else ""
            print(f"resuming at step {self.position.step} (epoch {self.position.epoch + 1}, batch "
                  f"{self.position.batch}){new}", file=sys.stderr, flush=True)
