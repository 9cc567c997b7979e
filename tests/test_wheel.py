"""The package as users install it: a wheel built from the checkout, installed into a fresh environment (its
dependencies taken from this one's site-packages), and the commands run from an empty folder, away from the
checkout: labelling with the shipped prompt templates, export, evaluation and the smoke demo over two seeds (with the
64-dim student: the projector case). The suite's one run of the CLIP demo: it checks the demo's outputs too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import REPO

CHECKOUT_ONLY = {".git", ".venv", "runs", "data", "build", "tests", "benchmarks", ".pytest_cache"}  # top level


def _run(command: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a new environment with the wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=lambda folder, names: [
        name for name in names if (Path(folder) == REPO and name in CHECKOUT_ONLY) or name.endswith(".egg-info")])
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", work / "dist",
          source], work)
    (wheel,) = (work / "dist").glob("clipkd_dino-*.whl")
    environment = work / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", environment], work)
    site = Path(sysconfig.get_path("purelib", vars={"base": environment, "platbase": environment}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")  # after the wheel's own files
    _run([sys.executable, "-m", "pip", "--python", environment / "bin" / "python", "install", "--no-deps",
          "--no-index", "-q", wheel], work)
    return environment / "bin"


def test_the_wheel_carries_what_the_commands_read_at_run_time(installed, tmp_path, toyworld_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([installed / "python", "-c", "import clipkd_dino, clipkd_dino.shipped as s; "
                  "print(clipkd_dino.__file__); print(s.ASSETS / 'toy_teacher.pt')"], empty).stdout.split()
    assert not where[0].startswith(str(REPO)), "the installed package, not the checkout's"
    teacher = Path(where[1])
    assert teacher.is_file() and not teacher.is_symlink() and not str(teacher.resolve()).startswith(str(REPO))
    clipkd = installed / "clipkd"

    pool = empty / "pool.json"
    pool.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": kind, "count": 1} for kind in ("circle", "star", "moon")]}))
    _run([clipkd, "label", "--teacher", "toy-teacher", "--teacher-pretrained", teacher, "--concepts", pool,
          "--data", toyworld_dir / "train" / "shards", "--out", "labels", "--workers", "0", "--device", "cpu"], empty)
    shipped_templates = json.loads((REPO / "concepts" / "prompts.json").read_text())["templates"]
    assert json.loads((empty / "labels" / "class_means.json").read_text())["templates"] == shipped_templates

    _run([clipkd, "export", teacher, "--out", "student"], empty)
    _run([clipkd, "eval", "--model", "local-dir:student", "--retrieval", toyworld_dir / "val" / "retrieval.jsonl",
          "--out", "eval.json", "--no-cache", "--workers", "0"], empty)
    assert json.loads((empty / "eval.json").read_text())["retrieval"]["any_caption"]["i2t_R@10"] > 0

    # the smoke demo over two seeds, with the 64-dim student (the projector case): the main job's every stage
    _run([clipkd, "demo", "--smoke", "--student", "toy-student", "--seeds", "2", "--device", "cpu"], empty,
         timeout=900)
    check_smoke_demo(empty / "runs" / "demo", empty / "data" / "toyworld_smoke")
    # the classification demo's recipes (its training is tested in test_demo.py)
    _run([installed / "python", "-c", "from clipkd_dino.classify.config import load_cls_config; "
          "from clipkd_dino.classify.demo import CONFIGS; "
          "[load_cls_config(CONFIGS / name, []) for name in ('teacher.yaml', 'student.yaml')]"], empty)


def check_smoke_demo(out: Path, data: Path) -> None:
    """The smoke demo's report, plots and summary: three students a seed over two seeds, the paired table in numbers
    and words, and the projector case (64-dim student, 96-dim teacher) in checkpoints, geometry and report."""
    report, summary = (out / "report.md").read_text(), json.loads((out / "summary.json").read_text())
    for row in ("teacher (toy-teacher)", "student: no teacher", "student: CLIP-KD |", "student: CLIP-KD + dino"):
        assert row in report
    assert "Against toyworld's ground truth" in report and "| coverage | min margin | precision |" in report
    assert "toy-student, embedding dim 64" in report and "BatchNorm -> Dropout -> Linear" in report
    for plot in ("curves.png", "losses.png", "norms.png", "labels/stats.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG"), plot
    assert [(s["name"], s["seed"]) for s in summary["students"]] == [
        (name, seed) for seed in (0, 1) for name in ("no teacher", "CLIP-KD", "CLIP-KD + dino")]
    assert sorted(summary["pool"]) == sorted(json.loads((data / "val" / "zeroshot" / "classnames.json").read_text()))
    # the paired table: dino minus CLIP-KD seed by seed, its interval, in words
    by = {(s["name"], s["seed"]): s["metrics"]["zeroshot"]["top1"] for s in summary["students"]}
    paired = summary["paired"]["zero-shot top-1"]
    assert paired["diffs"] == pytest.approx([by["CLIP-KD + dino", s] - by["CLIP-KD", s] for s in (0, 1)])
    assert paired["low"] <= paired["mean"] <= paired["high"]
    row = next(line for line in report.splitlines() if line.startswith("| zero-shot top-1 |"))
    assert f"[{paired['low']:+.2f}, {paired['high']:+.2f}]" in row and paired["verdict"] in row
    assert "Over 2 paired seeds the 95% interval excludes 0 for" in report or \
        "Over 2 paired seeds every 95% interval includes 0" in report
    # the projector case: FD and dino projectors trained and kept; the dino student measured through its projector
    dino_dir, kd_dir = out / "students" / "clip-kd_dino_seed0", out / "students" / "clip-kd_seed0"
    objective = torch.load(dino_dir / "checkpoints" / "latest.pt", weights_only=True)["objective"]
    assert {"project_image.weight", "dino_projector.2.weight"} <= set(objective)
    geometry = summary["geometry"]
    assert {"projected_norms", "cosine_teacher_means"} <= set(geometry["CLIP-KD + dino#0"])
    assert "cosine_teacher_means" not in geometry["CLIP-KD#0"]
    logs = [json.loads(line) for line in (dino_dir / "log.jsonl").read_text().splitlines()]
    assert "loss_dino" in logs[-1] and "loss_dino" not in json.loads(
        (kd_dir / "log.jsonl").read_text().splitlines()[-1])
