"""How often a 2-process gloo run aborts at its exit, by the way it ends (why `finish_process` exists).

    python benchmarks/gloo_exit.py [--runs 20]

Each run is `torchrun --standalone --nproc_per_node 2` of a few lines: DDP on a linear layer for 3 steps, an
all_reduce, an `all_gather_object`, then one of three endings: `return` (the interpreter finalises), `destroy` (the
same after `dist.destroy_process_group()`), `finish_process` (ours: `os._exit` once stdout and stderr are
flushed). A run counts as aborted when torchrun reports SIGABRT. The endings alternate run by run, so machine load
falls on all three alike. Prints a table.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

WORKER = """
import sys
import torch
import torch.distributed as dist
from clipkd_dino.engine.distributed import finish_process, init_distributed

init_distributed("cpu")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
for _ in range(3):
    model(torch.randn(4, 8)).sum().backward()
dist.all_reduce(torch.ones(3))
dist.all_gather_object([None, None], dist.get_rank())
ending = sys.argv[1]
if ending == "destroy":
    dist.destroy_process_group()
if ending == "finish_process":
    sys.exit(finish_process(0))
"""
ENDINGS = ("return", "destroy", "finish_process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs per ending")
    args = parser.parse_args()
    outcomes: dict[str, Counter] = {ending: Counter() for ending in ENDINGS}
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        for run in range(args.runs):
            for ending in ENDINGS:
                result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2", str(worker), ending],
                                        capture_output=True, text=True, timeout=300)
                kind = ("ok" if result.returncode == 0 else
                        "SIGABRT" if "SIGABRT" in result.stderr else "other failure")
                outcomes[ending][kind] += 1
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{e} {dict(outcomes[e])}" for e in ENDINGS),
                  file=sys.stderr, flush=True)
    import torch

    print(f"\n{platform.machine()}, {platform.python_version()}, torch {torch.__version__}, {args.runs} runs each\n")
    print("| ending | ok | SIGABRT | other failure |")
    print("|---|---|---|---|")
    for ending in ENDINGS:
        count = outcomes[ending]
        print(f"| {ending} | {count['ok']} | {count['SIGABRT']} | {count['other failure']} |")


if __name__ == "__main__":
    main()
