"""torch.distributed set-up for torchrun (gloo on CPU, NCCL on CUDA) and a gradient-exact all-gather."""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from clipkd_dino.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_joined_group = False  # whether this process has joined a torchrun process group (see `finish_process`)
SHARED_FOLDER_TIMEOUT = 60.0  # seconds a rank waits to see the probe file rank 0 wrote (check_shared_folder)
SLURM_DEFAULT_PORT = 29500  # MASTER_PORT of an srun job that sets none: 29500 + SLURM_JOB_ID % 10000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, as `scontrol show hostnames` would print it first:
    `gpu[007-010,012],cpu1` -> `gpu007`."""
    head = nodelist.split(",", 1)[0]
    if "[" not in head:
        return head
    prefix, ranges = nodelist[:nodelist.index("]")].split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


def adopt_slurm_environment(environ: dict[str, str] = os.environ) -> bool:
    """Describe a job started by `srun` (one task per GPU, no torchrun) as torchrun would: RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE (or
    SLURM_TASKS_PER_NODE's first count); MASTER_ADDR and MASTER_PORT kept when set, else the first host of
    SLURM_JOB_NODELIST and `SLURM_DEFAULT_PORT + SLURM_JOB_ID % 10000`. Nothing changes under torchrun (RANK is
    set) or outside a multi-task SLURM step. Returns whether the environment was adopted."""
    if "RANK" in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in environ:
        return False
    per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1")
    environ.update(RANK=environ["SLURM_PROCID"], WORLD_SIZE=environ["SLURM_NTASKS"],
                   LOCAL_RANK=environ.get("SLURM_LOCALID", "0"),
                   LOCAL_WORLD_SIZE=per_node.split("(")[0].split(",")[0])
    environ.setdefault("MASTER_ADDR", first_host(environ.get("SLURM_JOB_NODELIST", "localhost")))
    environ.setdefault("MASTER_PORT", str(SLURM_DEFAULT_PORT + int(environ.get("SLURM_JOB_ID", "0")) % 10000))
    return True


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun (or srun, see `adopt_slurm_environment`) describes in the environment;
    a single process otherwise."""
    global _joined_group
    adopt_slurm_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    _joined_group = True
    warning = shared_store_warning()
    if warning and os.environ.get("RANK") == "0":
        print(warning, file=sys.stderr, flush=True)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        store = _restart_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size)
    return DistInfo(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    world_size=dist.get_world_size())


def shared_store_warning(environ: Mapping[str, str] = os.environ) -> str | None:
    """A warning for several torchrun nodes under `--max-restarts` whose agents keep one store for every worker
    group, where a restarted group may not form (see `_restart_store`); None otherwise."""
    if (int(environ.get("GROUP_WORLD_SIZE", "1")) > 1 and int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)):
        return ("warning: several nodes under torchrun --max-restarts keep one store for every worker group, so a "
                "restarted group may fail to form: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node "
                "(docs/cluster.md)")
    return None


def _restart_store() -> dist.Store | None:
    """torchrun's store, seen under a prefix of its own for a restarted worker group; None outside torchrun, for
    its first group (which `init_process_group` joins as usual) and where each group gets a store of its own.

    torchrun's workers share its agent's store across restarts (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and
    `init_process_group` names its keys the same way every time: restarted workers could read the addresses the
    killed ones published and wait for them (seen with torch 2.14 and gloo: the restarted group hung in
    `init_process_group` about one restart in two). On several nodes the agents' restart counts differ (an agent
    whose workers are stopped because another node's failed does not count a restart), so there only a store of
    each group's own works: docs/cluster.md.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"clipkd/attempt_{attempt}", store)


def check_shared_folder(folder: Path, setting: str,
                        timeout: float = SHARED_FOLDER_TIMEOUT, poll: float = 0.2) -> None:
    """Every process of the job sees the same `folder` (the one `setting` names): rank 0 writes a file of a random
    name there, each other rank waits for it at most `timeout` seconds, and all learn who saw it (two collectives).
    A UserError naming the hosts and ranks that did not, on every rank; nothing in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    nonce = gathered_objects(secrets.token_hex(8))[0]
    probe = Path(folder) / f".clipkd-shared-{nonce}"
    if dist.get_rank() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(nonce)
    deadline = time.monotonic() + timeout
    seen = dist.get_rank() == 0
    while not seen and time.monotonic() < deadline:
        seen = probe.is_file() and probe.read_text() == nonce
        if not seen:
            time.sleep(poll)
    reports = gathered_objects((socket.gethostname(), dist.get_rank(), seen))
    if dist.get_rank() == 0:
        probe.unlink()
    blind = [f"{host} (rank {rank})" for host, rank, ok in reports if not ok]
    if blind:
        raise UserError(f"{setting} {folder} is not one folder for the whole job: {', '.join(blind)} did not see the "
                        f"file rank 0 ({reports[0][0]}) wrote there within {timeout:g} s; put it on a file system "
                        "every node shares")


def init_process(device_name: str) -> tuple[torch.device, DistInfo]:
    """The device (`auto`, `cpu`, `cuda`, `cuda:N`; under torchrun on CUDA: cuda:LOCAL_RANK) and the process group."""
    from clipkd_dino.runtime import resolve_device

    device = resolve_device(device_name)
    info = init_distributed(device.type)
    if device_name == "auto" and device.type == "cpu" and info.enabled and info.is_main:
        print(f"warning: device 'auto' found no working CUDA: {info.world_size} torchrun processes train on the CPU "
              "with gloo (set train.device=cuda to make this an error)", file=sys.stderr, flush=True)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device, info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish_process(code: int) -> int:
    """`code`, for the interpreter to exit with; a process that joined a process group ends here instead, with
    `os._exit(code)` once stdout and stderr are flushed.

    torch 2.14's gloo worker threads drop their reference to a finished collective's tensors after the caller has
    moved on. When the drop falls into interpreter finalisation, the thread cannot take the GIL, CPython ends it and
    the process aborts (SIGABRT, "terminate called without an active exception"): 10 of 60 2-process runs on a 2-core
    machine, 5 of 60 with the process group destroyed (DDP keeps it alive), 0 of 60 ended here
    (benchmarks/gloo_exit.py). Skipping finalisation loses nothing: callers close their logs and files, and free
    their loaders, before they finish.
    """
    if not _joined_group:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_KNOWN_SIZES: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("known_batch_sizes", default=None)


@contextlib.contextmanager
def known_batch_sizes(sizes: list[int]) -> Iterator[None]:
    """Within the block, `all_gather_with_grad` uses `sizes` (the batch size of every process, agreed beforehand)
    instead of exchanging them at each gather."""
    token = _KNOWN_SIZES.set(sizes)
    try:
        yield
    finally:
        _KNOWN_SIZES.reset(token)


def gathered_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """[tensor of rank 0, of rank 1, ...] (all the same shape); [tensor] in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (batch sizes may differ between processes, e.g. after dropping bad samples).

    The backward sums the incoming gradients over processes and keeps this process's rows, so that a loss computed
    identically on every process gets its exact gradient after DDP's averaging.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        sizes = _KNOWN_SIZES.get()
        if sizes is None:  # not agreed beforehand: ask (a collective and a host synchronisation)
            size = torch.tensor([tensor.shape[0]], device=tensor.device)
            parts = [torch.empty_like(size) for _ in range(world)]
            dist.all_gather(parts, size)
            sizes = [int(s) for s in parts]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.stop]


def summed_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """`counts` summed over all processes (key by key; a copy in a single process), for run summaries."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(counts)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    return dict(sum((Counter(c) for c in gathered), Counter()))


def gathered_objects(value: Any) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] (a one-element list in a single process); a collective: every
    process calls it at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B_r, ...] on process r -> [sum of B_r, ...] in rank order; identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)
