"""Beyond one node: `srun` tasks (SLURM's variables, no torchrun) and torchrun agents as two "nodes" form one job;
an output folder a node does not share, labelling outputs that differ between ranks, and a lost labelling rank end
with an error within a deadline; each node's copy of the teacher cache (distill.stage_dir); the SLURM scripts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from clipkd_dino.engine.distributed import _restart_store, adopt_slurm_environment, first_host, shared_store_warning
from conftest import REPO, torchrun_cli


def test_slurm_node_lists_and_variables_map_to_torchrun_names():
    assert first_host("gpu[007-010,012],cpu1") == "gpu007" and first_host("node1,node2") == "node1"
    assert first_host("a-b[3]") == "a-b3"
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "8(x2)",
             "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"}
    environ = dict(slurm)
    assert adopt_slurm_environment(environ)
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")} == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                                        "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu007",
                                                        "MASTER_PORT": "33742"}
    under_torchrun = dict(slurm, RANK="0", WORLD_SIZE="2")  # torchrun inside an srun step: its names win
    assert not adopt_slurm_environment(under_torchrun) and under_torchrun["WORLD_SIZE"] == "2"
    one_task = dict(slurm, SLURM_NTASKS="1")
    assert not adopt_slurm_environment(one_task) and "RANK" not in one_task


def test_restarted_groups_on_several_nodes_need_a_store_of_their_own(monkeypatch):
    """torchrun agents that keep one store for every group: a warning on several nodes under --max-restarts (their
    restart counts differ, so no prefix is agreed); with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a store per group) a
    restarted worker joins it as it is, without the single node's prefix of its restart count."""
    agents = {"GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_warning(agents)
    assert shared_store_warning(agents | {"TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert shared_store_warning(agents | {"GROUP_WORLD_SIZE": "1"}) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert _restart_store() is None


def write_config(tmp_path, toyworld_dir) -> None:
    """TMP/config.yaml: one epoch of the toy student on toyworld's 96 shard samples, batch 8, output TMP/run."""
    config = {"model": {"name": "toy-student"},
              "data": {"train": str(toyworld_dir / "train" / "shards"), "workers": 0, "augment": False},
              "optim": {"warmup_steps": 2},
              "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "output_dir": str(tmp_path / "run"),
                        "log_every_steps": 100, "eval_every_epochs": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))


def srun_tasks(tmp_path, toyworld_dir, per_task: list[list[str]]) -> list[tuple[int, str]]:
    """(exit code, stderr) of `clipkd train CONFIG OVERRIDES` started as len(per_task) SLURM tasks on this machine
    (SLURM's variables, no torchrun), task t with the overrides per_task[t]."""
    write_config(tmp_path, toyworld_dir)
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    slurm = {"SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost",
             "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tasks = [subprocess.Popen([sys.executable, "-m", "clipkd_dino.cli", "train", str(tmp_path / "config.yaml"),
                               *overrides],
                              env=environ | slurm | {"SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
                                                     "SLURM_NTASKS": str(len(per_task))},
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for task, overrides in enumerate(per_task)]
    errors = [task.communicate(timeout=300)[1] for task in tasks]
    return [(task.returncode, stderr) for task, stderr in zip(tasks, errors)]


def test_an_output_folder_one_node_does_not_see_is_an_error_naming_it(tmp_path, toyworld_dir):
    """Two "nodes" whose train.output_dir are different folders (as a node-local path would be): both stop within
    the deadline with one line naming the rank that does not see rank 0's files, before any training."""
    elsewhere = tmp_path / "node1_local"
    results = srun_tasks(tmp_path, toyworld_dir, [["train.shared_folder_timeout=2"],
                                                  ["train.shared_folder_timeout=2", f"train.output_dir={elsewhere}"]])
    host = socket.gethostname()
    for (code, stderr), folder in zip(results, (tmp_path / "run", elsewhere)):
        assert code == 2 and f"train.output_dir {folder} is not one folder for the whole job: {host} (rank 1) did " \
                              f"not see the file rank 0 ({host}) wrote there within 2 s" in stderr, stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists() and not list((tmp_path / "run").glob(".clipkd-shared-*"))


def test_rank_0_waits_for_lost_ranks_parts_with_a_deadline(tmp_path, monkeypatch):
    """The labelling merge waits for the other ranks' parts on the file system: no new part for --parts-timeout
    seconds is an error naming the missing units and their ranks, not a wait for ever."""
    from types import SimpleNamespace

    from clipkd_dino.data.samples import Unit
    from clipkd_dino.errors import UserError
    from clipkd_dino.teacher import label_pass

    monkeypatch.setattr(label_pass, "WAIT_POLL_SECONDS", 0.05)
    units = [Unit(f"cc3m/{n:06d}", f"/data/{n:06d}.tar", "cc3m") for n in range(4)]
    done = {units[0].name, units[2].name}  # rank 0's units of 2 ranks; rank 1's never come
    looks = []

    def part_done(unit: Unit) -> bool:
        looks.append(unit)
        assert len(looks) < 2000, "rank 0 waits for ever"
        return unit.name in done

    waiting = SimpleNamespace(units=units, parts=tmp_path / "parts", dist=SimpleNamespace(world_size=2),
                              settings=SimpleNamespace(parts_timeout=0.3), _done=part_done)
    with pytest.raises(UserError, match=r"no new part in .*parts for 0.3 s: 2 units of ranks \[1\] are missing "
                                        r"\(e.g. cc3m~000001.json\)"):
        label_pass.LabelPass._wait_for_parts(waiting)
    done.update({units[1].name, units[3].name})
    label_pass.LabelPass._wait_for_parts(waiting)  # all there: returns at once



def fake_labelling_output(folder, digest: str = "a" * 64):
    """A labelling output's files (random bytes) with the pass's digest in class_means.json and the cache manifest."""
    from clipkd_dino.distill.staging import read_files

    (folder / "cache").mkdir(parents=True, exist_ok=True)
    (folder / "cache" / "manifest.json").write_text(json.dumps({"digest": digest}))
    for n, name in enumerate(read_files(folder)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith(".json"):
            (folder / name).write_bytes(os.urandom(100 + n))
    (folder / "class_means.json").write_text(json.dumps({"digest": digest}))
    (folder / "samples" / "sources.json").write_text("{}")
    return folder


def test_a_node_copies_a_labelling_output_once_reuses_it_and_replaces_a_stale_one(tmp_path, capsys):
    import time

    from clipkd_dino.distill.staging import read_files, stage_outputs
    from clipkd_dino.errors import UserError

    source = fake_labelling_output(tmp_path / "labels")
    root = tmp_path / "stage"
    copy = stage_outputs([source], root, timeout=60)[source]
    assert copy == root / f"labels-{'a' * 16}" and "copied" in capsys.readouterr().err
    files = read_files(source)
    assert all((copy / name).read_bytes() == (source / name).read_bytes() for name in files)
    assert sorted(p.name for p in root.iterdir()) == [copy.name]  # no temporary left
    stamps = {name: (copy / name).stat().st_mtime_ns for name in files}
    assert stage_outputs([source], root, timeout=60)[source] == copy
    assert "reused its complete copy" in capsys.readouterr().err
    assert stamps == {name: (copy / name).stat().st_mtime_ns for name in files}  # nothing copied again

    (copy / "cache" / "images.npy").write_bytes(b"torn")  # an incomplete copy: replaced
    crashed = root / f".{copy.name}.tmp-node-1"  # a copy that crashed before its rename: removed, never used
    crashed.mkdir()
    (crashed / "stage.json").write_text("{}")
    os.utime(crashed, (time.time() - 120,) * 2)
    os.utime(crashed / "stage.json", (time.time() - 120,) * 2)
    stage_outputs([source], root, timeout=60)
    assert "copied" in capsys.readouterr().err and sorted(p.name for p in root.iterdir()) == [copy.name]
    assert (copy / "cache" / "images.npy").read_bytes() == (source / "cache" / "images.npy").read_bytes()

    fake_labelling_output(source, digest="b" * 64)  # labelled again: another pass, another copy
    assert stage_outputs([source], root, timeout=60)[source] == root / f"labels-{'b' * 16}"
    with pytest.raises(UserError, match=r"distill.stage_dir \$CLIPKD_UNSET/x: no node-local copy on .*\(rank 0\); "
                                        r"rank 0: distill.stage_dir \$CLIPKD_UNSET/x: \$CLIPKD_UNSET is not set on"):
        stage_outputs([source], "$CLIPKD_UNSET/x", timeout=60)  # not a folder named '$CLIPKD_UNSET'


def test_a_nodes_other_ranks_wait_for_its_copy_with_a_deadline(tmp_path):
    import threading

    from clipkd_dino.distill.staging import Stage
    from clipkd_dino.errors import UserError

    source = fake_labelling_output(tmp_path / "labels")
    stage = Stage(source, tmp_path / "stage")
    with pytest.raises(UserError, match=r"waited 0.5 s without progress for local rank 0's copy of .*labels to "
                                        r".*stage/labels-a{16} \(distill.stage_dir\)"):
        stage.wait(0.5)
    copier = threading.Timer(0.3, stage.make, (60,))
    copier.start()
    stage.wait(10)  # returns once local rank 0's copy is complete
    copier.join()
    assert stage.complete()


def test_labelling_outputs_that_differ_between_ranks_are_an_error_naming_them(tmp_path, monkeypatch):
    from clipkd_dino.distill import staging
    from clipkd_dino.errors import UserError

    source = fake_labelling_output(tmp_path / "labels")
    other_node = {"distill.cache": "labelling pass " + "b" * 16, "distill.labels": "labelling pass " + "a" * 16}
    monkeypatch.setattr(staging, "gathered_objects", lambda mine: [mine, mine, ("gpu2", other_node)])
    with pytest.raises(UserError) as error:
        staging.check_same_outputs({"distill.labels": source, "distill.cache": source})
    host = socket.gethostname()
    assert str(error.value) == (f"distill.cache {source} is not the same on every rank: rank 0 ({host}) reads "
                                f"labelling pass {'a' * 16}, rank 2 (gpu2) labelling pass {'b' * 16}; put it on a "
                                "file system every node shares (distill.stage_dir then copies it to each node's disk)")
    missing = staging._seen(tmp_path / "elsewhere")  # what a rank without the folder reports
    monkeypatch.setattr(staging, "gathered_objects", lambda mine: [mine, ("gpu1", {"distill.labels": missing})])
    with pytest.raises(UserError, match=r"rank 1 \(gpu1\) cannot read the digest of the labelling pass in "
                                        r".*elsewhere/class_means.json: No such file or directory; put it on"):
        staging.check_same_outputs({"distill.labels": source})


def test_srun_tasks_and_two_torchrun_nodes_staging_the_teacher_cache_train_the_same_job(tmp_path, toyworld_dir,
                                                                                        label_dir_shards, capfd):
    """Two processes started with SLURM's variables and no torchrun form one 2-process job reading the teacher cache
    and labels from the shared folder. Two torchrun agents as two nodes (`--nnodes 2`, c10d; one process each), with
    a stage folder per node (`$GROUP_RANK`, the node's rank, in distill.stage_dir), form the same job: each node
    copies the cache and labels once, its rank reads the copy, and the weights equal the shared-folder job's. A
    later start on a node reuses its copy."""
    from clipkd_dino.config import load_config
    from clipkd_dino.distill import build_objective
    from clipkd_dino.distill.staging import Stage
    from clipkd_dino.models.factory import create_model

    inputs = ["distill.teacher=toy-teacher", f"distill.cache={label_dir_shards}", f"distill.labels={label_dir_shards}"]
    shared = srun_tasks(tmp_path, toyworld_dir, [[*inputs, f"train.output_dir={tmp_path / 'shared'}"]] * 2)
    assert [code for code, _ in shared] == [0, 0], shared[0][1][-2000:] + shared[1][1][-2000:]
    assert "distill.stage_dir" not in shared[0][1]
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    # 96 samples over 2 processes of batch 8: one job of 6 steps, not two single-process runs of 12
    assert summary["processes"] == 2 and summary["steps"] == 6 and summary["hosts"] == [socket.gethostname()]

    train = ["train", str(tmp_path / "config.yaml"), *inputs]
    stage = tmp_path / "stage"
    staged = torchrun_cli(2, *train, f"distill.stage_dir={stage}/$GROUP_RANK", nodes=2)
    assert staged.returncode == 0, staged.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    copies = {node: Stage(label_dir_shards, stage / node).copy for node in ("0", "1")}
    for copy in copies.values():
        assert staged.stderr.count(f"reads {label_dir_shards} from {copy}: copied") == 1, staged.stderr[-3000:]
    weights, expected = (torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
                         for run in (tmp_path / "run", tmp_path / "shared"))
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, msg=name)

    # a later start on node 1 (here in this process) reuses its copy, and its objective reads the copy
    stamps = {path: path.stat().st_mtime_ns for path in copies["1"].rglob("*")}
    config = load_config(tmp_path / "config.yaml", [*inputs, f"distill.stage_dir={stage / '1'}"])
    targets = build_objective(config, create_model("toy-student"), torch.device("cpu")).batch_targets
    assert "reused its complete copy" in capfd.readouterr().err
    assert targets.cache.dir == copies["1"] / "cache" and targets.labels.directory == copies["1"]
    assert stamps == {path: path.stat().st_mtime_ns for path in copies["1"].rglob("*")}


def sbatch_options(script) -> dict[str, str]:
    """The `#SBATCH --key=value` lines of a batch script (a flag without a value maps to '')."""
    lines = [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]
    return dict((option.lstrip("-").split("=", 1) + [""])[:2] for option in lines)


def run_batch_script(tmp_path, script, nodes: int, srun_exit: int = 0) -> tuple[int, list[str], str]:
    """(exit code, srun's arguments, what scontrol was asked) of `script` run as SLURM would on `nodes` nodes of 8
    tasks, with an srun that records its arguments and exits with `srun_exit`."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    calls.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", f'printf "%s\\n" "$@" > {calls}/srun\nexit {srun_exit}'),
                       ("scontrol", f'echo "$@" > {calls}/scontrol')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    environ = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES=str(nodes),
                   SLURM_NTASKS_PER_NODE="8", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO))
    code = subprocess.run(["bash", str(script)], env=environ, timeout=60).returncode
    scontrol = calls / "scontrol"
    return code, (calls / "srun").read_text().splitlines(), scontrol.read_text().strip() if scontrol.exists() else ""


def test_slurm_scripts_start_one_task_per_gpu_and_requeue_a_stopped_training(tmp_path):
    """scripts/slurm/*.sbatch: 8 tasks of 10 cores on 8 GPUs a node, srun one task per GPU (a fake srun on the
    PATH), training with the recipe's global batch on 1 and 4 nodes, its caches staged on each node's disk, resumed
    (`--resume auto`) and requeued after SIGTERM made it save and exit 143."""
    from clipkd_dino.cli import build_parser
    from clipkd_dino.config import load_config

    train, label = REPO / "scripts" / "slurm" / "train.sbatch", REPO / "scripts" / "slurm" / "label.sbatch"
    for script in (train, label):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        options = sbatch_options(script)
        assert {key: options[key] for key in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task")} == \
            {"nodes": "1", "ntasks-per-node": "8", "gpus-per-node": "8", "cpus-per-task": "10"}
        assert "requeue" in options
    assert sbatch_options(train)["signal"] == "TERM@300"

    for nodes, batch in ((1, 128), (4, 32)):
        code, srun, requeued = run_batch_script(tmp_path, train, nodes)
        assert code == 0 and not requeued
        command = srun.index("-m")
        assert "--kill-on-bad-exit=1" in srun[:command] and srun[command + 1] == "clipkd_dino.cli"
        args = build_parser().parse_args(srun[command + 2:])  # the CLI takes it
        assert (args.command, args.config, args.resume) == ("train", "configs/clip/vit_b16_to_vit_t16_cc3m.yaml",
                                                            "auto")
        assert args.overrides == [f"train.batch_size={batch}", "data.workers=8",
                                  "distill.stage_dir=$TMPDIR/clipkd-stage"]  # $TMPDIR: each task's own
        config = load_config(REPO / args.config, args.overrides)
        assert config.train.batch_size * nodes * 8 == 1024 and config.data.workers + 2 == 10
    assert run_batch_script(tmp_path, train, 1, srun_exit=143)[::2] == (143, "requeue 4242")

    code, srun, _ = run_batch_script(tmp_path, label, 4)
    args = build_parser().parse_args(srun[srun.index("-m") + 2:])
    assert code == 0 and (args.command, args.workers, args.out, args.cache_views) == ("label", 8, "runs/cc3m_labels", 2)
