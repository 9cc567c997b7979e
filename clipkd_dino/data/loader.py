"""The one DataLoader factory of every command (training, labelling, evaluation), and what it guards.

- **Open files.** A worker hands each tensor of a batch over as one shared-memory file descriptor, open until the
  main process has received it; the common soft limit is 1,024. The soft limit is raised to the hard limit once per
  process (`raise_open_file_limit`), and collate functions stack per-sample tensors so a batch is a few descriptors.
- **No hang.** A worker that dies is reported by torch; a worker that is alive but whose batch never arrives (e.g. a
  failed hand-over in its queue thread) would leave the main process waiting for ever. Every batch has a deadline
  (`timeout` seconds, `data.worker_timeout`): past it, `batches` raises a UserError that names the setting.
- **/dev/shm.** Batches in flight live in `/dev/shm`: `workers x prefetch` batches per process, times the processes
  of the node. `check_shared_memory` compares that with the free space before any worker starts.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clipkd_dino.errors import ConfigError, UserError
from clipkd_dino.runtime import init_data_worker

log = logging.getLogger(__name__)
SHARED_MEMORY = "/dev/shm"
DEFAULT_TIMEOUT = 600.0  # seconds a batch may take before the loader is declared stuck


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit; returns the (soft, hard) limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. a hard limit above the kernel's nr_open: keep the soft limit
            pass
    return soft, hard


def processes_on_node() -> int:
    """The processes of this node that read data at the same time (torchrun's LOCAL_WORLD_SIZE, else 1)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_shared_memory(batch_bytes: int, workers: int, prefetch: int, what: str,
                        folder: str = SHARED_MEMORY) -> int:
    """The bytes of batches in flight on this node (`batch_bytes x workers x prefetch x processes on the node`);
    a ConfigError when they exceed the free space of `folder`, a warning above half of it. `what` names the
    settings to change. Nothing is checked without workers (batches are made in the process itself)."""
    if not workers or not os.path.isdir(folder):
        return 0
    in_flight = batch_bytes * workers * prefetch * processes_on_node()
    free = shutil.disk_usage(folder).free
    message = (f"data loading holds about {in_flight / 2**20:,.0f} MiB of batches in {folder} "
               f"({workers} workers x {prefetch} batches x {batch_bytes / 2**20:,.1f} MiB x {processes_on_node()} "
               f"processes on this node) and {free / 2**20:,.0f} MiB are free")
    if in_flight > free:
        raise ConfigError(f"{message}: lower {what}, or give the container more shared memory "
                          "(docker --shm-size)")
    if in_flight > free / 2:
        log.warning("%s: lower %s if other jobs share it", message, what)
    return in_flight


def data_loader(dataset: Dataset, *, workers: int, prefetch: int = 2, batch_size: int | None = 1,
                collate_fn: Callable | None = None, sampler: Sampler | None = None, drop_last: bool = False,
                seed: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> DataLoader:
    """A DataLoader with the project's settings: workers that ignore stop signals and close the output lock
    (`runtime.init_data_worker`), pinned memory on CUDA, `prefetch` batches in flight per worker, a per-batch
    `timeout` (seconds; 0: none) and, with `seed`, its own generator (worker seeds) so the global generator, and
    so dropout, is the same after a resume."""
    if workers:
        raise_open_file_limit()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn,
                      num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=prefetch if workers else None, worker_init_fn=init_data_worker,
                      generator=generator, timeout=timeout if workers else 0)


def batches(loader: DataLoader, setting: str) -> Iterator:
    """The loader's batches; a batch that does not arrive within the loader's timeout ends the command with a
    UserError naming `setting` (the worker's own error, when it raised one, comes through as it is)."""
    iterator = iter(loader)
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError as error:
                if "timed out" not in str(error):
                    raise
                raise UserError(f"no batch from the data loader's workers in {loader.timeout:.0f} s: a worker is "
                                f"stuck or lost its batch (e.g. too many open files: `ulimit -n`); raise {setting} "
                                "if batches are that slow") from None
            yield batch
    finally:  # now, not when an error's traceback lets go of this frame (a later fork could inherit the workers)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
