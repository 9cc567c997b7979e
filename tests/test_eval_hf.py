"""`--model hf:DIR`: a tiny randomly initialised transformers CLIPModel saved to a folder, features as transformers'."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """save_pretrained of a tiny CLIPModel, a CLIP BPE tokenizer (open_clip's first 300 merges), an image processor."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("hf_clip")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:301]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_model_features_equal_transformers(hf_dir, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from clipkd_dino.eval.encode import encode_image_set, encode_texts
    from clipkd_dino.eval.models import load_eval_model

    texts = ["a photo of a cat", "two dogs on the grass", "x"]
    for index in range(2):
        Image.new("RGB", (48 + 10 * index, 40), (30 * index, 90, 200)).save(tmp_path / f"{index}.png")
    paths = [tmp_path / f"{index}.png" for index in range(2)]
    loaded = load_eval_model(f"hf:{hf_dir}")
    ours_text = encode_texts(loaded.model, loaded.tokenizer, texts, torch.device("cpu"), batch_size=2)
    ours_image, _ = encode_image_set(loaded.model, paths, loaded.transform, torch.device("cpu"))

    model = CLIPModel.from_pretrained(hf_dir).eval()
    inputs = AutoTokenizer.from_pretrained(hf_dir)(texts, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(hf_dir)(images=[Image.open(p) for p in paths], return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**inputs)
        image = model.get_image_features(**pixels)
    torch.testing.assert_close(ours_text, getattr(text, "pooler_output", text))
    torch.testing.assert_close(ours_image, getattr(image, "pooler_output", image))


def test_clipkd_eval_hf_model(hf_dir, tmp_path):
    from clipkd_dino import cli

    (tmp_path / "img").mkdir()
    lines = []
    for index in range(3):
        Image.new("RGB", (40, 40), (80 * index, 20, 20)).save(tmp_path / "img" / f"{index}.png")
        lines.append(json.dumps({"image": f"img/{index}.png", "captions": [f"a red square {index}"]}))
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.json"
    assert cli.main(["eval", "--model", f"hf:{hf_dir}", "--retrieval", str(tmp_path / "val.jsonl"), "--out", str(out),
                     "--workers", "0", "--device", "cpu", "--no-cache"]) == 0
    report = json.loads(out.read_text())
    assert report["model"].startswith("hf:") and report["retrieval"]["num_images"] == 3
    assert cli.main(["eval", "--model", f"hf:{tmp_path}", "--retrieval", str(tmp_path / "val.jsonl"),
                     "--out", str(out), "--no-cache"]) == 2
