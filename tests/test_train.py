"""Training: loss math, optimiser groups and schedule, DDP equivalence, kill-and-resume, checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clipkd_dino.losses import clip_loss
from clipkd_dino.train.optim import build_optimizer, warmup_cosine_factor
from conftest import REPO, clipkd, torchrun_cli


def write_config(tmp_path: Path, toyworld_dir: Path, **sections) -> Path:
    config = {
        "model": {"name": "toy-student"},
        "data": {"train": str(toyworld_dir / "train" / "captions.csv"), "workers": 0, "augment": False},
        "optim": {"warmup_steps": 2, "lr": 1e-3},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "output_dir": str(tmp_path / "run"),
                  "log_every_steps": 1, "eval_every_epochs": 0},
    }
    for section, values in sections.items():
        config[section].update(values)
    path = tmp_path / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_contrastive_loss_matches_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # logits = 2 * I T^T = [[1.2, 0], [1.6, 2]]; rows: image->text, columns: text->image
    row0 = -math.log(math.exp(1.2) / (math.exp(1.2) + 1))
    row1 = -math.log(math.exp(2) / (math.exp(1.6) + math.exp(2)))
    col0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
    col1 = -math.log(math.exp(2) / (1 + math.exp(2)))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert clip_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-6)


def test_no_weight_decay_on_gains_biases_and_logit_scale():
    from clipkd_dino.models import create_model
    from clipkd_dino.config import OptimConfig

    model = create_model("toy-student")
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.2))
    no_decay, decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("ln_final.weight") for n in no_decay_names)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_warmup_then_cosine():
    assert warmup_cosine_factor(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine_factor(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine_factor(20, 4, 20) == pytest.approx(0.0)


def test_two_process_run_matches_one_process_with_same_global_batch(tmp_path, toyworld_dir):
    single = write_config(tmp_path / "one", toyworld_dir, train={"batch_size": 16, "epochs": 1})
    double = write_config(tmp_path / "two", toyworld_dir, train={"batch_size": 8, "epochs": 1})
    one = clipkd("train", str(single), "train.epochs=1")
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun_cli(2, "train", str(double))
    assert two.returncode == 0, two.stderr[-3000:]
    log_one, log_two = read_log(tmp_path / "one" / "run"), read_log(tmp_path / "two" / "run")
    assert log_one[0]["step"] == log_two[0]["step"] == 1
    assert log_two[0]["loss_task"] == pytest.approx(log_one[0]["loss_task"], abs=1e-5)
    # the gathered loss has exact gradients: later steps still agree
    assert log_two[4]["loss_task"] == pytest.approx(log_one[4]["loss_task"], abs=1e-4)
    summary = json.loads((tmp_path / "two" / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 16
    assert summary["seen_samples"] == 480  # both processes' counts


def test_checkpoint_loads_with_plain_open_clip(tmp_path, toyworld_dir):
    config = write_config(tmp_path, toyworld_dir, train={"epochs": 1})
    shards = toyworld_dir / "train" / "shards" / "train-{000000..000002}.tar"
    result = clipkd("train", str(config), f"data.train={shards}")
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    configs = REPO / "clipkd_dino" / "models" / "model_configs"
    script = (
        "import open_clip, torch\n"
        f"open_clip.add_model_config({str(configs)!r})\n"
        f"model, _, preprocess = open_clip.create_model_and_transforms('toy-student', pretrained={str(checkpoint)!r})\n"
        f"saved = torch.load({str(checkpoint)!r}, weights_only=True)['state_dict']\n"
        "assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())\n"
        "assert 'clipkd_dino' not in __import__('sys').modules\n"
        "print('ok')\n"
    )
    check = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "ok", check.stderr[-2000:]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochz=3", "unknown config key 'train.epochz'"),
        ("train.epochs=three", "config key 'train.epochs' must be int"),
        ("optim.betas=0.9", "config key 'optim.betas' must be a list"),
        ("train.precision=fp8", "config key 'train.precision' must be one of"),
        ("model.name=ViT-Nope-99", "unknown model name 'ViT-Nope-99'"),
        ("data.train=/nonexistent/train.csv", "config key 'data.train': file not found: /nonexistent/train.csv"),
        ("data.train=/nonexistent/shard-{000..003}.tar", "file not found: /nonexistent/shard-000.tar"),
        ("model.pretrained=/nonexistent/model.pt", "pretrained checkpoint not found: /nonexistent/model.pt"),
        ("data.val_zeroshot=/nonexistent/zs", "config key 'data.val_zeroshot': folder not found"),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path, toyworld_dir, capsys, override, message):
    from clipkd_dino.cli import main

    config = write_config(tmp_path, toyworld_dir)
    assert main(["train", str(config), override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists(), "nothing heavy may start before the config is checked"


def test_missing_config_file_exits_2(tmp_path, capsys):
    from clipkd_dino.cli import main

    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err


def test_compiled_objective_trains_like_the_eager_one(tmp_path):
    """`train.compile: true` (here with the aot_eager backend, which needs no C++ toolchain) gives the eager run's
    losses and keeps the checkpoints' key names."""
    from clipkd_dino.toyworld.generate import generate

    data = tmp_path / "data"
    generate(data, n_train=48, n_val=4, image_size=48, seed=3, workers=1, shard_size=48)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled_{compiled}"
        config = write_config(out, data, train={"epochs": 1, "batch_size": 8, "compile": compiled,
                                                "compile_backend": "aot_eager"},
                              data={"train": str(data / "train" / "shards"), "num_samples": 32})
        result = clipkd("train", str(config))
        assert result.returncode == 0, result.stderr[-2000:]
        runs[compiled] = read_log(out / "run")
    assert [r["step"] for r in runs[True]] == [1, 2, 3, 4]
    for eager, compiled in zip(runs[False], runs[True]):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    weights = torch.load(tmp_path / "compiled_True" / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert "visual.conv1.weight" in weights["state_dict"]
