"""The one CLIP loader (`load_clip` / `check_clip`): open_clip tags resolved offline from a Hugging Face cache laid out
in tmp_path, `local-dir:` folders, checkpoint files, `hf:` folders, and the QuickGELU activation of OpenAI's weights.
Tiny models only; nothing is downloaded."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from clipkd_dino.errors import ConfigError
from clipkd_dino.models import check_clip, create_model, load_clip, model_config
from clipkd_dino.export.targets import export_checkpoint
from clipkd_dino.models.factory import resolve
from clipkd_dino.models.loading import LoadedCLIP
from test_eval_hf import hf_dir  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "assets" / "toy_teacher.pt"
TEXTS = ["two red stars above a blue fish", "a green circle"]
FACTORY_LOG = "clipkd_dino.models.factory"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline (huggingface_hub reads its environment once, at import)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_file(hub: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """Lay `data` out as huggingface_hub keeps a downloaded file: blobs/SHA256, snapshots/REV/FILE -> the blob,
    refs/main naming REV. Returns the snapshot path (what hf_hub_download returns)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(data).hexdigest()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    snapshot = repo / "snapshots" / revision / filename
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def _teacher_state() -> dict[str, torch.Tensor]:
    return torch.load(TEACHER, weights_only=True)["state_dict"]


def _register_tag(monkeypatch, names: list[str], tag: str, repo_id: str, **extra) -> None:
    """An open_clip pretrained tag of the architectures `names` hosted at `repo_id`, in open_clip's own registry
    (which lists a QuickGELU tag under NAME and NAME-quickgelu)."""
    for name in names:
        monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name,
                            {tag: open_clip.pretrained._pcfg(hf_hub=f"{repo_id}/", **extra)})


def _register_quickgelu_teacher(monkeypatch) -> None:
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "toy-teacher-quickgelu",
                        {**model_config("toy-teacher"), "quick_gelu": True})


def _features(loaded: LoadedCLIP) -> tuple[torch.Tensor, torch.Tensor]:
    image = Image.new("RGB", (60, 50), (200, 40, 90))
    model = loaded.model.eval()
    with torch.no_grad():
        return model.encode_image(loaded.transform(image)[None]), model.encode_text(loaded.tokenizer(TEXTS))


def _uses_quick_gelu(model: torch.nn.Module) -> bool:
    return any(isinstance(module, open_clip.transformer.QuickGELU) for module in model.modules())


def test_open_clip_tag_loads_offline_from_the_hugging_face_cache(hub, monkeypatch):
    _register_tag(monkeypatch, ["toy-teacher"], "toyworld", "clipkd-test/toy-teacher")
    cached = _cache_file(hub, "clipkd-test/toy-teacher", "open_clip_model.safetensors", save(_teacher_state()))
    check_clip("toy-teacher", "toyworld")
    tagged, direct = load_clip("toy-teacher", "toyworld"), load_clip("toy-teacher", str(TEACHER))
    assert tagged.weights_file == cached and direct.weights_file == TEACHER
    for ours, reference in zip(_features(tagged), _features(direct)):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert (tagged.name, tagged.image_size, tagged.embed_dim, tagged.context_length) == ("toy-teacher", 48, 96, 32)
    assert tagged.mean == open_clip.OPENAI_DATASET_MEAN and tagged.std == open_clip.OPENAI_DATASET_STD
    assert tagged.logit_scale == pytest.approx(_teacher_state()["logit_scale"].exp().item())
    student = create_model("toy-teacher", "toyworld")  # the student's `model.pretrained` takes tags too
    torch.testing.assert_close(student.state_dict(), direct.model.state_dict(), rtol=0, atol=0)


def test_real_open_clip_tag_offline(hub):
    for call in (check_clip, load_clip):  # load_clip stops before building the 150 M-parameter model
        with pytest.raises(ConfigError) as error:
            call("ViT-B-16", "openai")
        message = str(error.value)
        assert "\n" not in message and "'ViT-B-16'" in message and "'openai'" in message
        assert "download them once" in message and "pass the weights file" in message
    with pytest.raises(ConfigError, match="nor is it an open_clip tag of 'ViT-B-16': openai, laion400m_e31"):
        check_clip("ViT-B-16", "no_such_tag")
    with pytest.raises(ConfigError, match="unknown model name 'ViT-B-99'"):
        check_clip("ViT-B-99", "openai")
    cached = _cache_file(hub, "timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors", b"weights")
    for name in ("ViT-B-16", "ViT-B-16-quickgelu"):
        check_clip(name, "openai")
        # OpenAI's weights were trained with QuickGELU: open_clip 3 alone would build GELU for "ViT-B-16"
        assert resolve(name, "openai").name == "ViT-B-16-quickgelu" and resolve(name, "openai").weights_file == cached


def test_quickgelu_tag_builds_the_quickgelu_architecture(hub, monkeypatch, caplog):
    _register_quickgelu_teacher(monkeypatch)
    _register_tag(monkeypatch, ["toy-teacher", "toy-teacher-quickgelu"], "openai_like", "clipkd-test/toy-openai",
                  quick_gelu=True)
    _cache_file(hub, "clipkd-test/toy-openai", "open_clip_model.safetensors", save(_teacher_state()))
    loaded = load_clip("toy-teacher", "openai_like")
    assert loaded.name == "toy-teacher-quickgelu" and _uses_quick_gelu(loaded.model)
    with caplog.at_level(logging.WARNING, logger=FACTORY_LOG):
        create_model("toy-teacher", "openai_like")
    assert "builds toy-teacher-quickgelu" in caplog.text


def test_local_dir_and_checkpoint_file_give_identical_features(tmp_path):
    folder = export_checkpoint(TEACHER, tmp_path / "exported")
    exported, checkpoint = load_clip(f"local-dir:{folder}"), load_clip(None, str(TEACHER))
    assert exported.weights_file == folder / "open_clip_model.safetensors"
    assert (checkpoint.name, checkpoint.weights_file) == ("toy-teacher", TEACHER)
    for ours, reference in zip(_features(exported), _features(checkpoint)):
        torch.testing.assert_close(ours, reference)
    with pytest.raises(ConfigError, match="holds its own weights"):
        check_clip(f"local-dir:{folder}", str(TEACHER))
    with pytest.raises(ConfigError, match="not an open_clip model folder"):
        check_clip(f"local-dir:{tmp_path}", None)
    with pytest.raises(ConfigError, match="pretrained checkpoint not found"):
        check_clip("toy-teacher", str(tmp_path / "missing.pt"))


class _OpenAIRelease(torch.nn.Module):
    """The layout of OpenAI's CLIP archives: open_clip's CLIP state (CLIP's one top-level buffer, attn_mask, is not
    saved) plus three int metadata tensors."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, parameter in clip.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, value in (("input_resolution", 48), ("context_length", 32), ("vocab_size", 95)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * x


def test_openai_torchscript_file_under_a_gelu_name_warns(tmp_path, monkeypatch, caplog):
    _register_quickgelu_teacher(monkeypatch)
    archive = tmp_path / "ViT-toy.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit
        torch.jit.script(_OpenAIRelease(create_model("toy-teacher", str(TEACHER))).eval()).save(str(archive))
    reference = load_clip("toy-teacher", str(TEACHER)).model.state_dict()
    with caplog.at_level(logging.WARNING):
        gelu = load_clip("toy-teacher", str(archive))
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) == 1 and logged[0].name == FACTORY_LOG  # nor open_clip's "initialized randomly"
    assert "OpenAI" in logged[0].getMessage() and "'toy-teacher-quickgelu'" in logged[0].getMessage()
    assert not _uses_quick_gelu(gelu.model) and gelu.weights_file == archive
    torch.testing.assert_close(gelu.model.state_dict(), reference, rtol=0, atol=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        quick = load_clip("toy-teacher-quickgelu", str(archive))
        load_clip("toy-teacher", str(TEACHER))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert _uses_quick_gelu(quick.model)
    torch.testing.assert_close(quick.model.state_dict(), reference, rtol=0, atol=0)


def test_hf_folder(hf_dir):  # noqa: F811
    loaded = load_clip(f"hf:{hf_dir}")
    assert loaded.name == f"hf:{hf_dir.resolve()}" and loaded.weights_file == hf_dir / "model.safetensors"
    assert (loaded.image_size, loaded.embed_dim, loaded.context_length) == (32, 24, 16)
    assert loaded.logit_scale == pytest.approx(loaded.model.model.logit_scale.exp().item())
    check_clip(f"hf:{hf_dir}", None)
    with pytest.raises(ConfigError, match="holds its own weights"):
        check_clip(f"hf:{hf_dir}", str(TEACHER))


def test_label_and_online_distillation_take_an_open_clip_tag_offline(hub, monkeypatch, toyworld_dir, tmp_path):
    """`clipkd label` and `clipkd train` (online teacher + dino) with `--teacher-pretrained TAG` read from the
    Hugging Face cache offline; labels made from the checkpoint file carry the same weights digest, so they are
    accepted with the tag's teacher."""
    import json

    import yaml

    from clipkd_dino.toyworld.generate import KINDS
    from clipkd_dino.teacher import load_labels
    from conftest import clipkd

    _register_tag(monkeypatch, ["toy-teacher"], "toyworld", "clipkd-test/toy-teacher")
    cached = _cache_file(hub, "clipkd-test/toy-teacher", "open_clip_model.safetensors", save(_teacher_state()))
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": k, "count": 1} for k in KINDS]}))
    common = ["--concepts", str(pool), "--data", str(toyworld_dir / "train" / "shards"), "--templates",
              str(toyworld_dir / "val" / "zeroshot" / "templates.json"), "--workers", "0", "--device", "cpu"]
    for out, pretrained in (("by_tag", "toyworld"), ("by_file", str(TEACHER))):
        result = clipkd("label", "--teacher", "toy-teacher", "--teacher-pretrained", pretrained,
                        "--out", str(tmp_path / out), *common)
        assert result.returncode == 0, result.stderr[-2000:]
    by_tag, by_file = load_labels(tmp_path / "by_tag"), load_labels(tmp_path / "by_file")
    assert by_tag.provenance["teacher_weights"] == str(cached)
    assert by_tag.provenance["teacher_sha256"] == by_file.provenance["teacher_sha256"]  # same weights, other file
    assert torch.equal(by_tag.labels, by_file.labels)
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "toy-student"},
        "data": {"train": str(toyworld_dir / "train" / "shards"), "workers": 0},
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "output_dir": str(tmp_path / "run"),
                  "log_every_steps": 1, "eval_every_epochs": 0},
        "distill": {"teacher": "toy-teacher", "teacher_pretrained": "toyworld", "labels": str(tmp_path / "by_file"),
                    "weights": {"dino": 1.0}},
    }))
    trained = clipkd("train", str(config))
    assert trained.returncode == 0, trained.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log and all("loss_dino" in entry for entry in log)
