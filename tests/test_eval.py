"""Evaluation: retrieval Recall@K (both protocols, ties, chunking), zero-shot math, readers, `clipkd eval`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipkd_dino import cli
from clipkd_dino.errors import UserError
from clipkd_dino.eval import (
    protocol_metrics,
    read_retrieval_file,
    read_zeroshot_dir,
    retrieval_metrics,
    zeroshot_accuracy,
    zeroshot_classifier,
)

E = torch.eye(3)
# 3 images (unit axes) and 4 captions. Image 0's FIRST caption points at image 1, its second at image 0.
IMAGES = E
CAPTIONS = torch.stack([E[1], E[0], E[1], E[2]])
OWNER = [0, 0, 1, 2]
KS = (1, 2, 3)


def test_any_caption_by_hand():
    # i2t ranks (wrong captions scoring >= best correct one): i0 -> 0, i1 -> 1 (c0 ties its c2), i2 -> 0.
    # t2i ranks: c0 -> 2 (images 1 and 2 score >= its image's 0), c1, c2, c3 -> 0.
    metrics = retrieval_metrics(IMAGES, CAPTIONS, OWNER, ks=KS)
    assert metrics == pytest.approx(
        {"i2t_R@1": 200 / 3, "i2t_R@2": 100, "i2t_R@3": 100, "t2i_R@1": 75, "t2i_R@2": 75, "t2i_R@3": 100}
    )


def test_first_caption_only_differs_from_any_caption():
    # one_to_one keeps c0, c2, c3: i2t ranks 2 (ties with c2 and c3 at 0), 1, 0; t2i ranks 2, 0, 0.
    expected = {"i2t_R@1": 100 / 3, "i2t_R@2": 200 / 3, "i2t_R@3": 100, "t2i_R@1": 200 / 3, "t2i_R@2": 200 / 3}
    expected["t2i_R@3"] = 100
    both = protocol_metrics(IMAGES, CAPTIONS, OWNER, ks=KS)
    assert both["one_to_one"] == pytest.approx(expected)
    assert both["any_caption"] == pytest.approx(retrieval_metrics(IMAGES, CAPTIONS, OWNER, ks=KS))
    assert both["any_caption"]["i2t_R@1"] > both["one_to_one"]["i2t_R@1"]


def test_ties_are_broken_against_the_correct_item():
    constant = retrieval_metrics(torch.ones(3, 4), torch.ones(6, 4), [0, 0, 1, 1, 2, 2], ks=(1, 4, 5))
    # an image query has 4 wrong captions tied with its own, a caption query 2 wrong images
    assert constant == {"i2t_R@1": 0, "i2t_R@4": 0, "i2t_R@5": 100, "t2i_R@1": 0, "t2i_R@4": 100, "t2i_R@5": 100}
    twins = retrieval_metrics(torch.ones(2, 4), torch.eye(4)[:2] + 1, [0, 1], ks=(1, 2))
    assert twins["i2t_R@1"] == 0 and twins["t2i_R@1"] == 0 and twins["t2i_R@2"] == 100


def test_numpy_input_and_normalisation():
    scaled = retrieval_metrics((7 * IMAGES).numpy(), (0.1 * CAPTIONS).numpy(), np.array(OWNER), ks=KS)
    assert scaled == retrieval_metrics(IMAGES, CAPTIONS, OWNER, ks=KS)


def _reference_ranks(queries: torch.Tensor, gallery: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Position of the first correct item in the full sorted score list (no ties in random data)."""
    order = (queries @ gallery.T).argsort(dim=1, descending=True)
    return correct.gather(1, order).float().argmax(dim=1)


def test_chunking_matches_a_full_sort():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(37, 8, generator=generator), torch.randn(150, 8, generator=generator)
    owner = torch.cat([torch.arange(37), torch.randint(0, 37, (113,), generator=generator)])
    results = [retrieval_metrics(images, texts, owner, chunk_size=size) for size in (1, 7, 10_000)]
    assert results[0] == results[1] == results[2]
    unit_i, unit_t = torch.nn.functional.normalize(images, dim=1), torch.nn.functional.normalize(texts, dim=1)
    i2t = _reference_ranks(unit_i, unit_t, torch.arange(37)[:, None] == owner[None, :])
    t2i = _reference_ranks(unit_t, unit_i, owner[:, None] == torch.arange(37)[None, :])
    for k in (1, 5, 10):
        assert results[0][f"i2t_R@{k}"] == pytest.approx(100 * (i2t < k).float().mean().item())
        assert results[0][f"t2i_R@{k}"] == pytest.approx(100 * (t2i < k).float().mean().item())


@pytest.mark.parametrize(
    ("owner", "message"), [([0, 0, 0, 2], "no caption"), ([0, 1, 2, 3], r"\[0, 3\)"), ([0, 1], "shape")]
)
def test_retrieval_metrics_rejects_bad_ground_truth(owner, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(IMAGES, CAPTIONS, owner)


class FakeEncoder(torch.nn.Module):
    """encode_text looks up a fixed vector per prompt id; encode_image is the identity."""

    def __init__(self, vectors: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(vectors))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images


@pytest.mark.parametrize("prompts_per_block", [8192, 2, 1])  # one block; a class a block (also when 1 < 2 templates)
def test_zeroshot_classifier_normalises_each_prompt_before_averaging(monkeypatch, prompts_per_block):
    import clipkd_dino.eval.zeroshot as zeroshot

    monkeypatch.setattr(zeroshot, "PROMPTS_PER_BLOCK", prompts_per_block)
    prompts = ["a cat", "the cat", "a dog", "the dog"]
    model = FakeEncoder([[3, 4, 0], [0, 2, 0], [0, 0, 7], [1, 0, 0]]).train()
    tokenizer = lambda texts: torch.tensor([[prompts.index(text)] for text in texts])  # noqa: E731
    classifier = zeroshot_classifier(model, tokenizer, ["cat", "dog"], ["a {}", "the {}"], torch.device("cpu"))
    # cat: mean([.6, .8, 0], [0, 1, 0]) = [.3, .9, 0] -> / sqrt(.9); dog: mean([0, 0, 1], [1, 0, 0]) -> / sqrt(.5)
    cat = torch.tensor([0.3, 0.9, 0.0]) / math.sqrt(0.9)
    dog = torch.tensor([0.5, 0.0, 0.5]) / math.sqrt(0.5)
    torch.testing.assert_close(classifier, torch.stack([cat, dog], dim=1))
    assert model.training, "the caller's train mode must be restored"


def test_zeroshot_accuracy_by_hand():
    features = torch.stack(
        [
            torch.eye(6)[0],  # label 0, top class -> top-1
            torch.arange(6, 0, -1).float(),  # label 5 scores lowest: rank 5 -> misses top-5
            torch.arange(1, 7).float(),  # label 1: 4 classes above it -> top-5 only
            torch.ones(6),  # all tied: rank 5 -> misses both
        ]
    )
    result = zeroshot_accuracy(7 * features, [0, 5, 1, 0], torch.eye(6))
    # per class: class 0 one of its two, classes 1 and 5 none of theirs (classes without samples do not count)
    assert result == {"top1": 25.0, "top5": 50.0, "mean_per_class_recall": pytest.approx(100 / 6), "num_samples": 4}
    two_classes = zeroshot_accuracy(torch.tensor([[0.0, 1.0]]), [0], torch.eye(2))
    assert two_classes["top1"] == 0 and two_classes["top5"] == 100  # top-5 capped at the 2 classes


def _make_dataset(root, num_images: int = 10) -> None:
    """images/, val.jsonl (1-3 captions per image) and a zero-shot set (classnames/templates/samples) in `root`."""
    (root / "images").mkdir()
    colours = ["red", "green", "blue"]
    lines, samples = [], ["filepath\tlabel"]
    for index in range(num_images):
        label = index % 3
        name = f"images/val-{index:07d}.png"
        rgb = tuple(200 if channel == label else 20 * index for channel in range(3))
        Image.new("RGB", (40, 36), rgb).save(root / name)
        captions = [f"a {colours[label]} square number {index}"] * (1 + index % 3)
        lines.append(json.dumps({"image": name, "captions": captions, "split": "val"}))
        samples.append(f"{name}\t{label}")
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    (root / "classnames.json").write_text(json.dumps(colours))
    (root / "templates.json").write_text(json.dumps(["a {} square", "a photo of a {} thing"]))
    (root / "samples.csv").write_text("\n".join(samples) + "\n")


def test_readers(tmp_path):
    _make_dataset(tmp_path)
    retrieval = read_retrieval_file(tmp_path / "val.jsonl")
    assert len(retrieval.images) == 10 and len(retrieval.captions) == 19
    assert retrieval.text_to_image[:4] == [0, 1, 1, 2] and retrieval.images[0].is_file()
    zeroshot = read_zeroshot_dir(tmp_path)
    assert zeroshot.classnames == ["red", "green", "blue"] and zeroshot.labels[:4] == [0, 1, 2, 0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"val.jsonl:2: invalid JSON"),
        ('{"image": "images/val-0000000.png"}', r"val.jsonl:2: missing key 'captions'"),
        ('{"image": "images/nope.png", "captions": ["x"]}', r"val.jsonl:2: image file not found"),
        ('{"image": "images/val-0000000.png", "captions": []}', r"val.jsonl:2: 'captions' must be a non-empty"),
    ],
)
def test_retrieval_reader_errors(tmp_path, line, message):
    _make_dataset(tmp_path, num_images=1)
    with (tmp_path / "val.jsonl").open("a") as file:
        file.write(line + "\n")
    with pytest.raises(UserError, match=message):
        read_retrieval_file(tmp_path / "val.jsonl")
    with pytest.raises(UserError, match="retrieval file not found"):
        read_retrieval_file(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("classnames.json", '["a", ', r"classnames.json:1: invalid JSON"),
        ("templates.json", '["a photo"]', r"templates.json: template without"),
        ("samples.csv", "path\tlabel\nimages/val-0000000.png\t0\n", r"samples.csv:1: header lacks"),
        ("samples.csv", "filepath\tlabel\nimages/val-0000000.png\t3\n", r"samples.csv:2: label 3 outside"),
        ("samples.csv", "filepath\tlabel\nimages/val-0000000.png\tx\n", r"samples.csv:2: label must be an integer"),
        ("samples.csv", "filepath\tlabel\nimages/nope.png\t0\n", r"samples.csv:2: image file not found"),
    ],
)
def test_zeroshot_reader_errors(tmp_path, file, content, message):
    _make_dataset(tmp_path, num_images=1)
    (tmp_path / file).write_text(content)
    with pytest.raises(UserError, match=message):
        read_zeroshot_dir(tmp_path)
    (tmp_path / "classnames.json").unlink()
    with pytest.raises(UserError, match="file not found: .*classnames.json"):
        read_zeroshot_dir(tmp_path)


TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[str, str]:
    """A randomly initialised tiny CLIP registered with open_clip as 'eval-test-tiny': (name, checkpoint)."""
    import open_clip

    config = tmp_path / "eval-test-tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("eval-test-tiny")
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "model_name": "eval-test-tiny"}, checkpoint)
    return "eval-test-tiny", str(checkpoint)


def test_clipkd_eval_end_to_end(tmp_path, tiny_checkpoint, capsys):
    name, checkpoint = tiny_checkpoint
    _make_dataset(tmp_path)
    out = tmp_path / "out" / "metrics.json"
    argv = ["eval", "--model", name, "--pretrained", checkpoint, "--out", str(out), "--workers", "0", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*argv, "--retrieval", str(tmp_path / "val.jsonl"), "--zeroshot", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == name and report["pretrained"].endswith("tiny.pt") and report["timestamp"]
    assert set(report["protocols"]) == {"any_caption", "one_to_one"}
    retrieval = report["retrieval"]
    assert (retrieval["num_images"], retrieval["num_captions"]) == (10, 19)
    for protocol in ("any_caption", "one_to_one"):
        assert set(retrieval[protocol]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
        assert all(0 <= value <= 100 for value in retrieval[protocol].values())
        assert retrieval[protocol]["t2i_R@10"] == 100  # only 10 images: every caption's image is in its top 10
    assert retrieval["one_to_one"]["i2t_R@10"] == 100  # and only 10 captions in the one_to_one gallery
    zeroshot = report["zeroshot"]
    assert zeroshot["num_samples"] == 10 and zeroshot["num_classes"] == 3 and zeroshot["top5"] == 100
    assert 0 <= zeroshot["top1"] <= 100
    printed = capsys.readouterr().out
    assert "any_caption" in printed and "one_to_one" in printed and "top1" in printed
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--pretrained", "missing.pt", "checkpoint not found"),
        ("--retrieval", "missing.jsonl", "retrieval file not found"),
        ("--model", "no-such-model", "unknown model name"),
        ("--retrieval", None, "nothing to evaluate"),
    ],
)
def test_clipkd_eval_user_errors_exit_2(
    tmp_path, monkeypatch, tiny_checkpoint, capsys, option, value, message
):
    name, checkpoint = tiny_checkpoint
    _make_dataset(tmp_path, num_images=1)
    monkeypatch.chdir(tmp_path)
    options = {"--model": name, "--pretrained": checkpoint, "--retrieval": "val.jsonl", option: value}
    argv = ["eval", "--out", "m.json", "--no-cache",
            *(item for key, val in options.items() if val for item in (key, val))]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "m.json").exists()
