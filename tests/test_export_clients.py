"""`clipkd export --onnx / --hf`: the towers in onnxruntime and the model in transformers give our features on
toyworld images and captions, fed the way a client without this package would (the settings file's preprocessing,
open_clip's BPE ids; transformers' own processor); architectures transformers cannot hold are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision import transforms as T

from clipkd_dino.errors import UserError
from clipkd_dino.models import create_model, load_clip
from clipkd_dino.export.common import eval_preprocess
from clipkd_dino.export.hf_clip import export_hf, hf_config
from clipkd_dino.export.onnx_towers import onnx_session
from conftest import clipkd

OUTSIDE_VOCABULARY = "Two ZEBRAS & a giraffe, at 5 o'clock!"  # words the toy vocabulary does not have


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A toy-student distillation checkpoint exported by `clipkd export CKPT --onnx D1 --hf D2`."""
    folder = tmp_path_factory.mktemp("clients")
    torch.manual_seed(7)
    torch.save({"state_dict": create_model("toy-student").state_dict(), "model_name": "toy-student", "epoch": 1,
                "objective": {"dino_projector.2.weight": torch.randn(96, 64)}}, folder / "latest.pt")
    result = clipkd("export", str(folder / "latest.pt"), "--onnx", str(folder / "onnx"), "--hf", str(folder / "hf"))
    assert result.returncode == 0, result.stderr
    assert f"wrote {folder / 'onnx'}" in result.stdout and f"wrote {folder / 'hf'}" in result.stdout
    return {"checkpoint": folder / "latest.pt", "onnx": folder / "onnx", "hf": folder / "hf"}


@pytest.fixture(scope="module")
def samples(toyworld_dir) -> tuple[list[Image.Image], list[str]]:
    """Three toyworld validation images, their first captions and a caption outside the toy vocabulary."""
    rows = [json.loads(line) for line in (toyworld_dir / "val" / "retrieval.jsonl").read_text().splitlines()[:3]]
    images = [Image.open(toyworld_dir / "val" / row["image"]).convert("RGB") for row in rows]
    return images, [row["captions"][0] for row in rows[:2]] + [OUTSIDE_VOCABULARY]


def _ours(checkpoint: Path, images: list[Image.Image], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features as this package computes them (its loader, compact tokenizer, eval transform)."""
    loaded = load_clip(None, str(checkpoint))
    with torch.no_grad():
        return (loaded.model.eval().encode_image(torch.stack([loaded.transform(image) for image in images])),
                loaded.model.encode_text(loaded.tokenizer(texts)))


def _client_preprocess(settings: dict):
    """The eval preprocessing rebuilt from clip_onnx.json alone, as a client without open_clip would."""
    assert settings["resize_mode"] == "shortest" and settings["interpolation"] == "bicubic"
    size = settings["image_size"]
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(settings["mean"], settings["std"])])


def _cosine(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    b = b.numpy()
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.slow
def test_onnx_towers_match_torch_at_batch_1_and_3(exported, samples):
    folder = exported["onnx"]
    assert sorted(p.name for p in folder.iterdir()) == ["bpe_simple_vocab_16e6.txt.gz", "clip_onnx.json",
                                                        "image.onnx", "text.onnx"]
    settings = json.loads((folder / "clip_onnx.json").read_text())
    tokenizer = settings["text"]["tokenizer"]
    assert tokenizer["context_length"] == 32 and tokenizer["vocab_size"] == 49408 and "compact" in tokenizer["note"]
    assert min(min(tower["min_cosine"].values()) for tower in settings["check"].values()) >= 0.9999
    images, texts = samples
    pixels = torch.stack([_client_preprocess(settings["image"]["preprocess"])(image) for image in images])
    bpe = SimpleTokenizer(str(folder / tokenizer["bpe_vocabulary"]), context_length=tokenizer["context_length"])
    token_ids = bpe(texts)
    assert (token_ids[token_ids < 49406] > 94).any()  # plain BPE ids, not the compact vocabulary's
    ours = dict(zip(("image", "text"), _ours(exported["checkpoint"], images, texts)))
    for tower, inputs in (("image", pixels), ("text", token_ids)):
        session = onnx_session(folder / settings[tower]["file"])
        assert session.get_inputs()[0].name == settings[tower]["input"]["name"]
        assert session.get_inputs()[0].shape[0] == "batch"
        for batch in (1, 3):
            theirs = session.run(None, {settings[tower]["input"]["name"]: inputs[:batch].numpy()})[0]
            assert theirs.shape == (batch, 64)
            assert _cosine(theirs, ours[tower][:batch]).min() >= 0.9999, (tower, batch)


@pytest.mark.slow
def test_hf_toy_student_matches_open_clip(exported, samples):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(exported["hf"], local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(exported["hf"], local_files_only=True)
    assert model.config.text_config.eos_token_id == 49407 and model.config.vision_config.hidden_act == "gelu"
    images, texts = samples
    ours_image, ours_text = _ours(exported["checkpoint"], images, texts)
    inputs = processor(text=texts, images=images, return_tensors="pt", padding="max_length", truncation=True)
    bpe = SimpleTokenizer(context_length=32)(texts)
    for ids, open_clip_ids in zip(inputs["input_ids"], bpe):
        end = int((open_clip_ids == 49407).nonzero()[0, 0]) + 1
        assert ids[:end].tolist() == open_clip_ids[:end].tolist()  # same ids up to the end-of-text token
    pixels = torch.stack([eval_preprocess(create_model("toy-student"))(image) for image in images])
    assert (inputs["pixel_values"] - pixels).abs().max() <= 1.5 / 255 / 0.26  # rounding: at most 1.5 grey levels
    with torch.no_grad():
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = model.get_image_features(pixel_values=pixels)
    assert (text.pooler_output - ours_text).abs().max() <= 1e-4
    assert (image.pooler_output - ours_image).abs().max() <= 1e-4


@pytest.mark.slow
def test_hf_vit_t16_matches_open_clip(tmp_path, samples):
    from transformers import CLIPModel

    torch.manual_seed(0)
    ours = create_model("ViT-T-16").eval()
    export_hf(ours, "ViT-T-16", tmp_path / "vit-t-16")
    theirs = CLIPModel.from_pretrained(tmp_path / "vit-t-16", local_files_only=True).eval()
    assert (theirs.config.vision_config.num_attention_heads, theirs.config.text_config.num_attention_heads) == (3, 6)
    images, texts = samples
    pixels = torch.stack([eval_preprocess(ours)(image) for image in images])
    tokens = open_clip.get_tokenizer("ViT-T-16")(texts)
    with torch.no_grad():
        image_diff = (theirs.get_image_features(pixel_values=pixels).pooler_output - ours.encode_image(pixels))
        text_diff = theirs.get_text_features(input_ids=tokens).pooler_output - ours.encode_text(tokens)
    assert image_diff.abs().max() <= 1e-4 and text_diff.abs().max() <= 1e-4


def test_hf_quick_gelu_and_layer_norm_eps(tmp_path, samples):
    """A toy architecture with QuickGELU and LayerNorm eps 1e-3 maps to hidden_act and layer_norm_eps."""
    from transformers import CLIPModel

    config = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2,
                             "norm_kwargs": {"eps": 1e-3}},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                           "norm_kwargs": {"eps": 1e-3}}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "clients-test-quickgelu.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    ours = create_model("clients-test-quickgelu").eval()
    export_hf(ours, "clients-test-quickgelu", tmp_path / "hf")
    theirs = CLIPModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert theirs.config.vision_config.hidden_act == "quick_gelu" and theirs.config.text_config.layer_norm_eps == 1e-3
    images, texts = samples
    pixels = torch.stack([eval_preprocess(ours)(image) for image in images])
    tokens = SimpleTokenizer(context_length=16)(texts)
    with torch.no_grad():
        assert (theirs.get_image_features(pixel_values=pixels).pooler_output
                - ours.encode_image(pixels)).abs().max() <= 1e-4
        assert (theirs.get_text_features(input_ids=tokens).pooler_output
                - ours.encode_text(tokens)).abs().max() <= 1e-4


@pytest.mark.parametrize("name, why", [("RN50", "ModifiedResNet"), ("convnext_base", "timm"),
                                       ("ViT-B-16-SigLIP", "SigLIP"), ("coca_ViT-B-32", "attentional pooling"),
                                       ("ViT-M-16-alt", "layer scale")])
def test_hf_refuses_architectures_transformers_cannot_hold(name, why):
    with pytest.raises(UserError, match=why) as error:
        hf_config(name)
    assert name in str(error.value) and "\n" not in str(error.value)


def test_cli_refuses_before_writing(tmp_path):
    checkpoint = tmp_path / "rn50.pt"
    torch.save({"model_name": "RN50", "state_dict": {}}, checkpoint)
    refused = clipkd("export", str(checkpoint), "--onnx", str(tmp_path / "onnx"), "--hf", str(tmp_path / "hf"))
    assert refused.returncode == 2 and "RN50" in refused.stderr and "ModifiedResNet" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "hf").exists()
    no_target = clipkd("export", str(checkpoint))
    assert no_target.returncode == 2 and "--out DIR (open_clip), --onnx DIR or --hf DIR" in no_target.stderr
    same = clipkd("export", str(checkpoint), "--onnx", str(tmp_path / "x"), "--out", str(tmp_path / "x"))
    assert same.returncode == 2 and "its own folder" in same.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    full = clipkd("export", str(checkpoint), "--hf", str(tmp_path / "full"))
    assert full.returncode == 2 and "--hf" in full.stderr and "must be a new or empty folder" in full.stderr
