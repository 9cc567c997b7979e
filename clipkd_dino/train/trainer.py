"""The training loop: one code path for a 2-core CPU and a torchrun GPU cluster.

Outputs in `train.output_dir`:
  config.yaml                 the resolved configuration
  checkpoints/epoch_N.pt      the model after epoch N (open_clip-loadable)
  checkpoints/latest.pt       model + optimiser + scheduler + position, for `--resume latest`
  log.jsonl                   losses, learning rate and samples/s every `train.log_every_steps` steps
  metrics.jsonl               evaluation results after epochs
  summary.json                final metrics, wall time, skipped-sample counts
  tensorboard/                the same scalars for TensorBoard
"""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
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

from clipkd_dino.config import Config, check_values, config_to_dict
from clipkd_dino.data.loader import check_shared_memory
from clipkd_dino.data.pairs import PairImages, TrainData
from clipkd_dino.data.samples import check_sources
from clipkd_dino.distill import build_objective, check_distill
from clipkd_dino.errors import ConfigError
from clipkd_dino.eval.evaluate import evaluate_model
from clipkd_dino.eval.retrieval import read_retrieval_file
from clipkd_dino.eval.zeroshot import read_zeroshot_dir
from clipkd_dino.files import write_json_atomic
from clipkd_dino.models import create_model, get_tokenizer, image_transforms, model_config
from clipkd_dino.models.loading import check_clip
from clipkd_dino.runtime import autocast
from clipkd_dino.engine.checkpoint import load_checkpoint, resolve_resume
from clipkd_dino.engine.distributed import (check_shared_folder, gathered_objects, gathered_tensors, init_process,
                                           known_batch_sizes, shutdown_distributed, summed_counts)
from clipkd_dino.data.faults import bad_fraction_exceeded
from clipkd_dino.engine.guard import (NonFiniteGuard, OutputLock, StopSignals, save_checkpoint,
                                     stop_on_bad_fraction)
from clipkd_dino.distill.objectives import CONTRASTIVE_LOSSES, MAX_LOGIT_SCALE
from clipkd_dino.train.optim import build_optimizer, build_scheduler
from clipkd_dino.engine.runlog import RunLog, flatten_numbers


CHECKPOINT_NAME = "latest.pt"
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 draws dropout and masks from seed + r x this


def random_state(device: torch.device) -> dict[str, Any]:
    """This process's CPU generator and, on CUDA, its device's generator."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_random_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


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


def check_inputs(config: Config) -> None:
    """Every check that needs no heavy work: values, model name, files. Raises ConfigError naming the key."""
    check_values(config)
    check_clip(config.model.name, config.model.pretrained)
    check_sources(config.data.train, config.data.format)
    if config.data.val_retrieval and not Path(config.data.val_retrieval).is_file():
        raise ConfigError(f"config key 'data.val_retrieval': file not found: {config.data.val_retrieval}")
    if config.data.val_zeroshot and not Path(config.data.val_zeroshot).is_dir():
        raise ConfigError(f"config key 'data.val_zeroshot': folder not found: {config.data.val_zeroshot}")
    check_distill(config)


def stream_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between the stream a checkpoint was saved on and this run's, as `key: saved -> now`."""
    if saved is None:
        return ["the checkpoint predates stream fingerprints"]
    return [f"{key}: {saved.get(key)} -> {current.get(key)}" for key in dict.fromkeys([*saved, *current])
            if saved.get(key) != current.get(key)]


class Trainer:
    def __init__(self, config: Config, resume: str | None = None, new_stream: bool = False) -> None:
        check_inputs(config)
        self.config, self.new_stream = config, new_stream
        self.output_dir = Path(config.train.output_dir)
        resume_path = resolve_resume(resume, self.output_dir) if resume else None
        self.device, self.dist = init_process(config.train.device)
        check_shared_folder(self.output_dir, "train.output_dir", config.train.shared_folder_timeout)
        device = self.device

        torch.manual_seed(config.train.seed)
        self.model = create_model(config.model.name, config.model.pretrained, device)
        self.tokenizer = get_tokenizer(config.model.name)
        self.architecture = model_config(config.model.name)  # what a config file or local-dir: said, for checkpoints
        train_transform, self.eval_transform = image_transforms(
            self.model, config.data.augment, tuple(config.data.crop_scale)
        )
        self.objective = build_objective(config, self.model, device)
        if self.dist.rank:  # the same weights everywhere (DDP broadcasts them anyway), a random stream per rank
            torch.manual_seed(config.train.seed + RANK_SEED_STRIDE * self.dist.rank)
        if config.train.compile:  # in place: state dicts keep their names
            self.objective.compile(backend=config.train.compile_backend)
        images = PairImages(train_transform, self.objective.views, self.objective.num_views)
        self.data = TrainData(config.data, images, self.tokenizer, config.train.batch_size,
                              self.dist.rank, self.dist.world_size, config.train.seed,
                              getattr(self.objective, "batch_targets", None))
        self.val_retrieval = (read_retrieval_file(config.data.val_retrieval, check_images=False, skip_bad=True)
                              if config.data.val_retrieval else None)
        self.val_zeroshot = read_zeroshot_dir(config.data.val_zeroshot) if config.data.val_zeroshot else None
        self.wrapped = (
            DistributedDataParallel(self.objective, device_ids=[device.index] if device.type == "cuda" else None,
                                    find_unused_parameters=not self.objective.uses_every_parameter)
            if self.dist.enabled else self.objective
        )
        accum = config.optim.accum_steps
        self.steps_per_epoch = self.data.steps_per_epoch // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"optim.accum_steps={accum} is more than the {self.data.steps_per_epoch} batches "
                              "of an epoch")
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.stream = self.data.fingerprint() | {"optim.accum_steps": accum}
        check_shared_memory(self.data.batch_bytes(), config.data.workers, config.data.prefetch,
                            "data.prefetch or data.workers (or train.batch_size)")
        self.optimizer = build_optimizer(self.objective, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim.warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
        self.position = Position()
        self.skipped: Counter = Counter()
        self.seen = 0  # samples read, good and bad (the max_bad_fraction denominator)
        self.underfull = 0  # micro-batches not trained: fewer than two readable samples on some process
        self.nonfinite = NonFiniteGuard(config.train.max_nonfinite_steps)
        self.cursors: dict[int, dict] = {}  # webdataset stream -> the cursor of its last batch done this epoch
        self.signals = StopSignals()
        if resume_path:
            self._restore(load_checkpoint(resume_path))
        self.lock = OutputLock(self.output_dir) if self.dist.is_main else None  # taken once nothing can fail
        self.log = RunLog(self.output_dir, self.dist.is_main)
        if self.dist.is_main:
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    # ----------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        start = time.time()
        global_batch = self.config.train.batch_size * self.dist.world_size * self.config.optim.accum_steps
        try:
            with self.signals:
                metrics = self._epochs()
            summary = {
                "model": self.config.model.name,
                "epochs": self.config.train.epochs,
                "steps": self.position.step,
                "processes": self.dist.world_size,
                "hosts": sorted(set(gathered_objects(socket.gethostname()))),  # the nodes of the job
                "global_batch": global_batch,
                "data_epochs": self.data.epochs,  # exact (each sample once an epoch) or resampled
                "contrastive_batch": global_batch,  # the contrastive terms see every micro-batch of the step
                "wall_seconds": round(time.time() - start, 1),
                "skipped_samples": summed_counts(self.skipped),
                "seen_samples": summed_counts({"seen": self.seen}).get("seen", 0),  # over every process
                "underfull_batches": self.underfull,  # the same on every process (they agree on each batch)
                "nonfinite_steps": self.nonfinite.total,
                "checkpoint": str(self.output_dir / "checkpoints" / f"epoch_{self.config.train.epochs}.pt"),
                "metrics": metrics,
            }
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
        while self.position.epoch < self.config.train.epochs:
            self._train_epoch()
            stop_on_bad_fraction(self.skipped, self.seen, self.config.data.max_bad_fraction, "data.train",
                                 self.device, final=True)  # the end of a pass: judged whatever was seen
            self.position = Position(self.position.epoch + 1, 0, self.position.step)
            self.cursors = {}
            epoch = self.position.epoch
            self._save(self.output_dir / "checkpoints" / f"epoch_{epoch}.pt", full=False)
            self._save(self.output_dir / "checkpoints" / "latest.pt", full=True)  # before evaluating: kept whatever
            every = self.config.train.eval_every_epochs
            if (every and epoch % every == 0) or epoch == self.config.train.epochs:
                metrics = self._evaluate()
        return metrics

    def _train_epoch(self) -> None:
        """One epoch, one host synchronisation per optimiser step outside logging steps: the micro-batches of the
        next step are fetched before the step ends, and a single exchange (`_agree`) tells every process whether
        the step was finite, whether any process was signalled or read too much bad data, and the sizes of the next
        step's micro-batches on every process (for the underfull check and the feature gathers)."""
        cfg, pos = self.config, self.position
        accum = cfg.optim.accum_steps
        total = self.steps_per_epoch * accum
        batches = self.data.epoch_batches(pos.epoch, skip_batches=pos.batch, cursors=self.cursors)
        progress = tqdm(total=total, initial=pos.batch, disable=not self.dist.is_main,
                        desc=f"epoch {pos.epoch + 1}/{cfg.train.epochs}", unit="batch", dynamic_ncols=True)
        window = {"start": time.perf_counter(), "samples": 0, "waited": 0.0}
        self.wrapped.train()
        try:
            pending = self._fetch(batches, min(accum, total - pos.batch), window)
            agreed = self._agree(None, pending)
            while pending:
                losses = self._train_step(pending, agreed.sizes, window, progress)
                pending = self._fetch(batches, min(accum, total - pos.batch), window)
                norm = self._gradient_norm()
                agreed = self._agree(torch.isfinite(sum(losses.values(), norm)).logical_not(), pending)
                if agreed.bad_data:
                    stop_on_bad_fraction(self.skipped, self.seen, cfg.data.max_bad_fraction, "data.train",
                                         self.device)
                self.nonfinite.check(agreed.nonfinite, losses, norm)  # raises after a streak
                lr = self._optimizer_step(skip=agreed.nonfinite)
                if losses and not agreed.nonfinite and (pos.step == 1 or pos.step % cfg.train.log_every_steps == 0):
                    self._log_window(losses, norm, lr, window, progress)
                latest = self.output_dir / "checkpoints" / "latest.pt"
                every = cfg.train.checkpoint_every_steps
                if (every and pos.step % every == 0) or agreed.stop:
                    self._save(latest, full=True)
                if agreed.stop:
                    raise self.signals.stopped(f"at step {pos.step} (epoch {pos.epoch + 1}, batch {pos.batch})",
                                               f"saved {latest}")
        finally:
            progress.close()  # also on an error, so that its message starts a line of its own
            batches.close()  # its loader workers stop now, not whenever the generator is collected
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
        accum = self.config.optim.accum_steps
        local = torch.full((3 + accum,), -1.0, device=self.device)
        local[0] = nonfinite.float() if nonfinite is not None else 0.0
        local[1] = float(self.signals.received is not None)
        local[2] = float(bad_fraction_exceeded(self.skipped, self.seen, self.config.data.max_bad_fraction))
        local[3:3 + len(upcoming)] = torch.tensor([float(len(b["images"])) for b in upcoming])
        rows = torch.stack(gathered_tensors(local)).tolist()  # the step's one host synchronisation
        sizes = [[int(row[3 + m]) for row in rows] for m in range(len(upcoming))]
        return Agreed(any(row[0] > 0 for row in rows), any(row[1] > 0 for row in rows),
                      any(row[2] > 0 for row in rows), sizes)

    def _train_step(self, micro_batches: list[dict], sizes: list[list[int]], window: dict,
                    progress: tqdm) -> dict[str, torch.Tensor]:
        """Forward and backward of a step's micro-batches; returns the step's named losses, on the device."""
        accum = self.config.optim.accum_steps
        # BatchNorm (the dino projector) and the contrastive losses need two samples on every process
        trained = [m for m, per_rank in enumerate(sizes) if min(per_rank) >= min(2, self.config.train.batch_size)]
        for batch in micro_batches:
            if "cursor" in batch:
                cursor = batch.pop("cursor")
                self.cursors[cursor["stream"]] = cursor
            self.skipped.update(batch["skipped"])
            self.seen += len(batch["images"]) + sum(batch["skipped"].values())
        self.underfull += len(micro_batches) - len(trained)
        batches = [self._to_device(micro_batches[m]) for m in trained]
        accumulated, whole = None, None
        if len(batches) > 1:  # the contrastive terms see every micro-batch: their embeddings first, no gradient
            with torch.no_grad(), autocast(self.device, self.config.train.precision):
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

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _forward_backward(self, batch: dict, sync: bool, accumulated: list[dict] | None,
                          index: int) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch. Under accumulation each micro-batch's pass carries the whole
        contrastive loss (only its own embeddings have a gradient, so the passes sum to the whole batch's
        gradient) and a 1/k share of the per-sample terms."""
        no_sync = self.wrapped.no_sync if self.dist.enabled and not sync else contextlib.nullcontext
        accum = self.config.optim.accum_steps
        with no_sync():
            with autocast(self.device, self.config.train.precision):
                named = self.wrapped(batch, accumulated, index) if accumulated else self.wrapped(batch)
            contrastive = sum(v for k, v in named.items() if k in CONTRASTIVE_LOSSES)
            per_sample = sum(v for k, v in named.items() if k not in CONTRASTIVE_LOSSES)
            self.scaler.scale((contrastive if accumulated else contrastive / accum) + per_sample / accum).backward()
        return {"loss": sum(named.values()), **named}

    def _gradient_norm(self) -> torch.Tensor:
        """The global gradient norm (a device tensor; unscaled first under fp16), clipped to `optim.grad_clip`."""
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.config.optim.grad_clip or math.inf)

    def _optimizer_step(self, skip: bool) -> float:
        """The optimiser and scheduler step; with `skip` (a non-finite loss or gradient on some process) the
        gradients are dropped and the weights stay as they were."""
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()  # no gradients: updates nothing, keeps the optimiser's step count in line
            self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        self.position.step += 1
        return lr

    def _log_window(self, losses: dict[str, torch.Tensor], norm: torch.Tensor, lr: float, window: dict,
                    progress: tqdm) -> None:
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        rate, wait = window["samples"] / elapsed, window["waited"] / elapsed
        values = {name: float(value) for name, value in losses.items()}
        self._log(values | {"grad_norm": float(norm)}, lr, rate, wait)
        progress.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}",
                             data_wait=f"{wait:.0%}", skipped=sum(self.skipped.values()))
        window.update(start=time.perf_counter(), samples=0, waited=0.0)

    # ------------------------------------------------------------------------------------ outputs and state
    def _log(self, losses: dict[str, float], lr: float, samples_per_s: float, data_wait: float) -> None:
        """A log.jsonl line and TensorBoard scalars: losses, lr, samples/s (all processes), the share of the
        window's wall time spent waiting for data (high: the loader starves the step), the peak GPU memory."""
        record = {"step": self.position.step, "epoch": self.position.epoch, **losses, "lr": lr,
                  "samples_per_s": samples_per_s, "data_wait": round(data_wait, 4),
                  "logit_scale": float(self.model.logit_scale.detach().exp())}
        if self.device.type == "cuda":
            record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.log.train(record)

    def _evaluate(self) -> dict[str, Any]:
        if not self.dist.is_main or not (self.val_retrieval or self.val_zeroshot):
            return {}
        with torch.random.fork_rng(devices=[]):  # evaluating leaves training's random stream as it was
            metrics = evaluate_model(self.model, self.tokenizer, self.eval_transform, retrieval=self.val_retrieval,
                                     zeroshot=self.val_zeroshot, device=self.device,
                                     precision=self.config.train.precision, num_workers=self.config.data.workers,
                                     skip_bad=True)  # a bad validation image is counted, never a crash
        self.log.metrics({"epoch": self.position.epoch, "step": self.position.step, **metrics})
        tqdm.write(f"[epoch {self.position.epoch}] " + "  ".join(
            f"{k}={v:.2f}" for k, v in flatten_numbers(metrics).items() if k.endswith(("R@1", "top1"))))
        self.model.train()
        return metrics

    def _save(self, path: Path, full: bool) -> None:
        # every rank's data streams and random generators (a collective: every rank saves at the same steps)
        if full:
            cursors, rng = gathered_objects(self.cursors), gathered_objects(random_state(self.device))
        if not self.dist.is_main:
            return
        payload: dict[str, Any] = {
            "state_dict": self.model.state_dict(),
            "model_name": self.config.model.name,
            "model_config": self.architecture,
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch,
            "step": self.position.step,
            "batches_per_epoch": self.steps_per_epoch * self.config.optim.accum_steps,
            "config": config_to_dict(self.config),
        }
        if full:
            payload |= {
                "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "skipped": dict(self.skipped),
                "seen": self.seen,
                "underfull": self.underfull,
                "rng": rng,  # per rank: dropout and masks continue as if never stopped
                "data_cursors": cursors,  # per rank: where each webdataset stream of the epoch stands
                "stream": self.stream,  # what the cursors and the position in the epoch refer to
            }
        save_checkpoint(payload, path, payload["state_dict"])

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from a full checkpoint. On the stream it was saved on (its fingerprint equal), exactly: every
        rank's generators and loader cursors. On another stream only with `new_stream`: the epoch goes on from the
        same share of its batches, each rank keeping its freshly seeded generators."""
        if "optimizer" not in state:
            raise ConfigError("--resume needs a full checkpoint (checkpoints/latest.pt), not an epoch_N.pt file")
        if state["model_name"] != self.config.model.name:
            raise ConfigError(f"--resume: the checkpoint is a {state['model_name']!r} model, the config says "
                              f"{self.config.model.name!r}")
        changed = stream_changes(state.get("stream"), self.stream)
        if changed and not self.new_stream:
            raise ConfigError(f"--resume: this run's data stream is not the one {CHECKPOINT_NAME} was saved on "
                              f"({'; '.join(changed)}): resume with the saved settings, or add --new-stream to run "
                              "the epoch's remaining steps on the new stream")
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped.update(state["skipped"])
        self.seen, self.underfull = state.get("seen", 0), state.get("underfull", 0)
        if changed:  # each rank keeps its freshly seeded generator; the epoch goes on in proportion
            saved_batches = state.get("batches_per_epoch") or self.steps_per_epoch * self.config.optim.accum_steps
            done = min(state["batch_in_epoch"] / saved_batches, 1.0)
            batch = round(done * self.steps_per_epoch) * self.config.optim.accum_steps
        else:
            set_random_state(state["rng"][self.dist.rank], self.device)
            self.cursors, batch = state["data_cursors"][self.dist.rank], state["batch_in_epoch"]
        self.position = Position(state["epoch"], batch, state["step"])
        if self.dist.is_main:
            new = (f" on a new data stream ({'; '.join(changed)}): the epoch's remaining "
                   f"{self.steps_per_epoch - batch // self.config.optim.accum_steps} steps read the new stream "
                   "from the same share of the epoch, so some of its samples may be seen twice or not at all this "
                   "epoch") if changed else ""
            print(f"resuming at step {self.position.step} (epoch {self.position.epoch + 1}, batch "
                  f"{self.position.batch}){new}", file=sys.stderr, flush=True)


def train(config: Config, resume: str | None = None, new_stream: bool = False) -> dict[str, Any]:
    """Train a CLIP model as `config` says; returns the run summary. `new_stream`: a resume may continue on a data
    stream other than the saved one (see `Trainer._restore`)."""
    return Trainer(config, resume, new_stream).run()
