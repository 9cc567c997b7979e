"""A model is named the way open_clip users name one: an architecture name, an open_clip JSON config file, or a
`local-dir:` folder; checkpoints trained from either keep their architecture, so they load without the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipkd_dino.errors import ConfigError
from clipkd_dino.models import create_model
from clipkd_dino.export.targets import export_checkpoint
from clipkd_dino.models.factory import MODEL_CONFIG_DIR, architecture_name, checkpoint_model_name
from conftest import REPO, clipkd
from test_train import write_config

EVAL_CHECKPOINT_ALONE = """
import sys
from clipkd_dino.models.loading import load_clip
loaded = load_clip(None, sys.argv[1])
print(loaded.name, loaded.embed_dim)
"""


def _narrow_config(tmp_path: Path, name: str = "my-arch") -> Path:
    """toy-student with a 48-dim embedding, an architecture open_clip does not ship."""
    config = json.loads((MODEL_CONFIG_DIR / "toy-student.json").read_text()) | {"embed_dim": 48}
    path = tmp_path / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def test_a_config_file_names_an_architecture_and_its_checkpoints_load_without_it(tmp_path, toyworld_dir):
    arch = _narrow_config(tmp_path)
    config = write_config(tmp_path, toyworld_dir, model={"name": str(arch)}, train={"epochs": 1})
    result = clipkd("train", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    assert torch.load(checkpoint, weights_only=True)["model_config"]["embed_dim"] == 48
    arch.unlink()  # a new process, the config file gone: the checkpoint says what it is
    alone = subprocess.run([sys.executable, "-c", EVAL_CHECKPOINT_ALONE, str(checkpoint)], capture_output=True,
                           text=True, cwd=tmp_path, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert alone.stdout.split() == ["my-arch", "48"]


def test_a_local_dir_folder_starts_a_student_and_its_checkpoints_load(tmp_path, toyworld_dir):
    # exported into a folder named like the shipped architecture, whose config differs (the spread vocabulary)
    folder = export_checkpoint(REPO / "assets" / "toy_teacher.pt", tmp_path / "toy-teacher")
    config = write_config(tmp_path, toyworld_dir, model={"name": f"local-dir:{folder}"},
                          train={"epochs": 1}, optim={"lr": 1e-9, "warmup_steps": 1})
    result = clipkd("train", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    name = checkpoint_model_name(checkpoint)
    assert name.startswith("toy-teacher-"), name  # the shipped name keeps its own meaning
    trained = create_model(name, str(checkpoint)).state_dict()
    start = create_model(f"local-dir:{folder}").state_dict()
    assert set(trained) == set(start)
    for key, tensor in start.items():  # the student started from the folder's weights (lr 1e-9: still there)
        torch.testing.assert_close(trained[key], tensor, atol=1e-5, rtol=0, msg=key)


def test_config_file_names_are_refused_in_one_line(tmp_path):
    taken = _narrow_config(tmp_path, "toy-student")
    with pytest.raises(ConfigError, match="already knows another architecture named 'toy-student'") as error:
        architecture_name(str(taken))
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError, match="nowhere.json: cannot read"):
        architecture_name(str(missing))
    not_a_model = tmp_path / "list.json"
    not_a_model.write_text(json.dumps({"embed_dim": 3}))
    with pytest.raises(ConfigError, match="not an open_clip model config"):
        architecture_name(str(not_a_model))
    assert "\n" not in str(error.value)
    assert architecture_name(str(_narrow_config(tmp_path, "other"))) == "other" == architecture_name("other")


def test_eval_takes_a_config_file_with_weights(tmp_path, toyworld_dir):
    arch = _narrow_config(tmp_path, "eval-arch")
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(create_model(str(arch)).state_dict(), weights)
    result = clipkd("eval", "--model", str(arch), "--pretrained", str(weights),
                    "--retrieval", str(toyworld_dir / "val" / "retrieval.jsonl"), "--out", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["retrieval"]["num_images"] == 24
