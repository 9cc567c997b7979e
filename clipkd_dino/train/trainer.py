"""CLIP training and distillation as a task of the run engine (`engine.loop`): one code path for a 2-core CPU and a
torchrun GPU cluster.

Outputs in `train.output_dir`:
  config.yaml                 the resolved configuration
  checkpoints/epoch_N.pt      the model after epoch N (open_clip-loadable)
  checkpoints/latest.pt       model + objective + optimiser + scheduler + position + every rank's random state, for
                              `--resume latest`
  log.jsonl                   losses, learning rate and samples/s every `train.log_every_steps` steps
  metrics.jsonl               evaluation results after epochs
  summary.json                final metrics, wall time, skipped-sample counts
  tensorboard/                the same scalars for TensorBoard
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from clipkd_dino.config import Config, check_values, config_to_dict
from clipkd_dino.data.loader import check_shared_memory
from clipkd_dino.data.pairs import PairImages, TrainData
from clipkd_dino.data.samples import check_sources
from clipkd_dino.distill import build_objective, check_distill
from clipkd_dino.losses.clip import MAX_LOGIT_SCALE
from clipkd_dino.engine.distributed import DistInfo, gathered_objects
from clipkd_dino.engine.guard import save_checkpoint
from clipkd_dino.engine.loop import Engine, RunSettings, Task
from clipkd_dino.engine.runlog import flatten_numbers
from clipkd_dino.errors import ConfigError
from clipkd_dino.eval.evaluate import evaluate_model
from clipkd_dino.eval.retrieval import read_retrieval_file
from clipkd_dino.eval.zeroshot import read_zeroshot_dir
from clipkd_dino.models import create_model, get_tokenizer, image_transforms, model_config
from clipkd_dino.models.loading import check_clip
from clipkd_dino.train.optim import build_optimizer, build_scheduler


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


def run_settings(config: Config) -> RunSettings:
    train = config.train
    return RunSettings(output_dir=Path(train.output_dir), device=train.device, seed=train.seed, epochs=train.epochs,
                       batch_size=train.batch_size, precision=train.precision, log_every_steps=train.log_every_steps,
                       max_nonfinite_steps=train.max_nonfinite_steps, accum_steps=config.optim.accum_steps,
                       grad_clip=config.optim.grad_clip, checkpoint_every_steps=train.checkpoint_every_steps,
                       max_bad_fraction=config.data.max_bad_fraction, data_name="data.train",
                       shared_folder_timeout=train.shared_folder_timeout)


class ClipTask(Task):
    """CLIP training, from scratch (the contrastive loss) or distilled (`distill`): a CLIP model and its objective
    on image-text pairs; open_clip-loadable epoch_N.pt checkpoints, retrieval and zero-shot evaluation."""

    weights_files = "an epoch_N.pt file"
    min_micro_batch = 2  # BatchNorm (the dino projector) and the contrastive losses need two samples

    def __init__(self, config: Config) -> None:
        check_inputs(config)
        self.config, self.model_name = config, config.model.name

    def build(self, device: torch.device, dist: DistInfo) -> torch.nn.Module:
        config, self.device, self.dist = self.config, device, dist
        self.model = create_model(config.model.name, config.model.pretrained, device)
        self.tokenizer = get_tokenizer(config.model.name)
        self.architecture = model_config(config.model.name)  # what a config file or local-dir: said, for checkpoints
        self.train_transform, self.eval_transform = image_transforms(
            self.model, config.data.augment, tuple(config.data.crop_scale)
        )
        self.objective = build_objective(config, self.model, device)
        return self.objective

    def prepare(self) -> None:
        config = self.config
        if config.train.compile:  # in place: state dicts keep their names
            self.objective.compile(backend=config.train.compile_backend)
        images = PairImages(self.train_transform, self.objective.views, self.objective.num_views)
        self.data = TrainData(config.data, images, self.tokenizer, config.train.batch_size,
                              self.dist.rank, self.dist.world_size, config.train.seed,
                              getattr(self.objective, "batch_targets", None))
        self.val_retrieval = (read_retrieval_file(config.data.val_retrieval, check_images=False, skip_bad=True)
                              if config.data.val_retrieval else None)
        self.val_zeroshot = read_zeroshot_dir(config.data.val_zeroshot) if config.data.val_zeroshot else None
        check_shared_memory(self.data.batch_bytes(), config.data.workers, config.data.prefetch,
                            "data.prefetch or data.workers (or train.batch_size)")

    def batches_per_epoch(self) -> int:
        return self.data.steps_per_epoch

    def optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.objective, self.config.optim)

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int):
        return build_scheduler(optimizer, self.config.optim.warmup_steps, total_steps)

    def epoch_batches(self, epoch: int, skip: int, cursors: dict[int, dict]) -> Iterator[dict]:
        return self.data.epoch_batches(epoch, skip_batches=skip, cursors=cursors)

    def forward(self, wrapped: torch.nn.Module, batch: dict, accumulated: list[dict] | None,
                index: int) -> dict[str, torch.Tensor]:
        return wrapped(batch, accumulated, index) if accumulated else wrapped(batch)

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def log_fields(self) -> dict[str, float]:
        return {"logit_scale": float(self.model.logit_scale.detach().exp())}

    def fingerprint(self) -> dict[str, Any]:
        return self.data.fingerprint()

    def state(self) -> dict[str, Any]:
        return {"state_dict": self.model.state_dict(), "model_config": self.architecture,
                "config": config_to_dict(self.config)}

    def end_epoch(self, run: Engine) -> dict[str, Any]:
        """epoch_N.pt, latest.pt (before evaluating: kept whatever evaluation does), then the evaluation if due."""
        epoch = run.position.epoch
        if run.dist.is_main:
            payload = {"model_name": self.model_name, "epoch": epoch, "batch_in_epoch": run.position.batch,
                       "step": run.position.step, "batches_per_epoch": run.batches_per_epoch} | self.state()
            save_checkpoint(payload, run.output_dir / "checkpoints" / f"epoch_{epoch}.pt", payload["state_dict"])
        run.save_latest()
        every = self.config.train.eval_every_epochs
        if (every and epoch % every == 0) or epoch == self.config.train.epochs:
            return self._evaluate(run)
        return {}

    def _evaluate(self, run: Engine) -> dict[str, Any]:
        if not self.dist.is_main or not (self.val_retrieval or self.val_zeroshot):
            return {}
        with torch.random.fork_rng(devices=[]):  # evaluating leaves training's random stream as it was
            metrics = evaluate_model(self.model, self.tokenizer, self.eval_transform, retrieval=self.val_retrieval,
                                     zeroshot=self.val_zeroshot, device=self.device,
                                     precision=self.config.train.precision, num_workers=self.config.data.workers,
                                     skip_bad=True)  # a bad validation image is counted, never a crash
        run.log.metrics({"epoch": run.position.epoch, "step": run.position.step, **metrics})
        tqdm.write(f"[epoch {run.position.epoch}] " + "  ".join(
            f"{k}={v:.2f}" for k, v in flatten_numbers(metrics).items() if k.endswith(("R@1", "top1"))))
        self.model.train()
        return metrics

    def summary(self, common: dict[str, Any], run: Engine, metrics: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        global_batch = config.train.batch_size * self.dist.world_size * config.optim.accum_steps
        return {
            "model": config.model.name,
            "epochs": config.train.epochs,
            "steps": common.pop("steps"),
            "processes": common.pop("processes"),
            "hosts": sorted(set(gathered_objects(socket.gethostname()))),  # the nodes of the job
            "global_batch": global_batch,
            "data_epochs": self.data.epochs,  # exact (each sample once an epoch) or resampled
            "contrastive_batch": global_batch,  # the contrastive terms see every micro-batch of the step
            **common,
            "checkpoint": str(run.output_dir / "checkpoints" / f"epoch_{config.train.epochs}.pt"),
            "metrics": metrics,
        }


class Trainer(Engine):
    """The engine running a `ClipTask`."""

    def __init__(self, config: Config, resume: str | None = None, new_stream: bool = False) -> None:
        super().__init__(ClipTask(config), run_settings(config), resume, new_stream)

    @property
    def model(self) -> torch.nn.Module:
        return self.task.model

    @property
    def data(self) -> TrainData:
        return self.task.data


def train(config: Config, resume: str | None = None, new_stream: bool = False) -> dict[str, Any]:
    """Train a CLIP model as `config` says; returns the run summary. `new_stream`: a resume may continue on a data
    stream other than the saved one (see `Engine._restore`)."""
    return Trainer(config, resume, new_stream).run()
