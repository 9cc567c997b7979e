"""`clipkd export`: the student as an open_clip local-dir model that plain open_clip loads, in a process that never
imports clipkd_dino, with the same features as our loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipkd_dino import cli
from clipkd_dino.eval.encode import encode_image_set, encode_texts
from clipkd_dino.eval.models import load_eval_model
from clipkd_dino.models import create_model

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle on a blue background", "two green stars", "an unknown zebra!"]
PLAIN_OPEN_CLIP = """
import json, sys
import open_clip, torch
from PIL import Image
image_path, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
features = {}
for folder in sys.argv[4:]:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.open(image_path))[None])[0]
        text = model.encode_text(tokenizer(texts))
    features[folder] = {"image": image.tolist(), "text": text.tolist()}
assert not any(name.startswith("clipkd_dino") for name in sys.modules), "clipkd_dino was imported"
json.dump(features, open(out, "w"))
"""


def _distillation_checkpoint(path: Path) -> None:
    """What the trainer's latest.pt holds for a distilled toy student: the CLIP model plus the distiller's state."""
    torch.manual_seed(3)
    student = create_model("toy-student")
    torch.save({"state_dict": student.state_dict(), "model_name": "toy-student", "epoch": 1, "step": 5,
                "config": {"model": {"name": "toy-student"}},
                "objective": {"dino_projector.2.weight": torch.randn(96, 64), "icl_scale": torch.tensor(2.6)},
                "optimizer": {"state": {}, "param_groups": []}}, path)


@pytest.mark.slow
def test_export_round_trip_through_plain_open_clip(tmp_path):
    checkpoints = {"teacher": REPO / "assets" / "toy_teacher.pt", "distilled": tmp_path / "latest.pt"}
    _distillation_checkpoint(checkpoints["distilled"])
    image = tmp_path / "image.png"
    Image.new("RGB", (60, 50), (200, 40, 90)).save(image)
    folders = []
    for name, checkpoint in checkpoints.items():
        folder = tmp_path / name
        assert cli.main(["export", str(checkpoint), "--out", str(folder)]) == 0
        assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
        config = json.loads((folder / "open_clip_config.json").read_text())
        assert set(config) == {"model_cfg", "preprocess_cfg"} and config["model_cfg"]["text_cfg"]["vocab_size"] == 49408
        model = create_model(torch.load(checkpoint, weights_only=True)["model_name"], str(checkpoint))
        assert set(load_file(folder / "open_clip_model.safetensors")) == set(model.state_dict())
        folders.append(str(folder))
    out = tmp_path / "features.json"
    plain = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(image), json.dumps(TEXTS), str(out), *folders],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    theirs = json.loads(out.read_text())
    for folder, checkpoint in zip(folders, checkpoints.values()):
        ours = load_eval_model(None, str(checkpoint))  # our loader: the compact tokenizer, the checkpoint as written
        text = encode_texts(ours.model, ours.tokenizer, TEXTS, torch.device("cpu"))
        pixels, _ = encode_image_set(ours.model, [image], ours.transform, torch.device("cpu"))
        torch.testing.assert_close(text, torch.tensor(theirs[folder]["text"]))
        torch.testing.assert_close(pixels[0], torch.tensor(theirs[folder]["image"]))


def test_export_refuses_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    assert cli.main(["export", str(REPO / "assets" / "toy_teacher.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "must be a new or empty folder" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
