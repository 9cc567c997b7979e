"""The embedded toy data set: determinism, layout and formats, ground truth, caption grammar, CLI errors."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipkd_dino.cli import main
from clipkd_dino.toyworld import commands
from clipkd_dino.toyworld.generate import (
    COLOURS,
    DEFAULT_SHARD_SIZE,
    KINDS,
    ZEROSHOT_TEMPLATES,
    generate,
    render_sample,
    vocabulary_words,
)
from clipkd_dino.toyworld.captions import COUNT_WORDS, PLURALS, make_captions
from clipkd_dino.toyworld.scene import SIZE_WORDS, sample_scene

N_TRAIN, N_VAL, SIZE, SEED, SHARD = 20, 40, 48, 3, 16
NOUN_KIND = {**{plural: kind for kind, plural in PLURALS.items()}, **{kind: kind for kind in KINDS}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toyworld") / "world"
    summary = generate(out, N_TRAIN, N_VAL, image_size=SIZE, seed=SEED, workers=1, shard_size=SHARD)
    return out, summary


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        header, *rows = list(csv.reader(f, delimiter="\t"))
    return header, rows


def _shard_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted((split_dir / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return samples


def test_same_arguments_give_same_bytes_whatever_the_workers(world: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = world
    again = generate(tmp_path / "again", N_TRAIN, N_VAL, image_size=SIZE, seed=SEED, workers=2, shard_size=SHARD)
    assert again == summary
    assert _files(tmp_path / "again") == _files(out)


def test_another_seed_gives_other_images_and_captions() -> None:
    first = [render_sample(SEED, "train", i, SIZE) for i in range(8)]
    other = [render_sample(SEED + 1, "train", i, SIZE) for i in range(8)]
    assert all(a[0] != b[0] and a[1]["captions"] != b[1]["captions"] for a, b in zip(first, other))
    # Splits are seeded apart too.
    assert render_sample(SEED, "train", 0, SIZE)[0] != render_sample(SEED, "val", 0, SIZE)[0]


def test_layout_csv_and_shards(world: tuple[Path, dict]) -> None:
    out, summary = world
    assert json.loads((out / "toyworld.json").read_text()) == summary
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        split_dir = out / split
        header, rows = _read_tsv(split_dir / "captions.csv")
        assert header == ["filepath", "title"]
        assert len(rows) == 5 * n
        per_image = Counter(path for path, _ in rows)
        assert set(per_image.values()) == {5}
        assert all((split_dir / path).is_file() and path.startswith("images/") for path in per_image)

        samples = _shard_samples(split_dir)
        sizes = json.loads((split_dir / "shards" / "sizes.json").read_text())
        assert sum(sizes.values()) == n == len(samples) == summary["splits"][split]["images"]
        assert sorted(sizes) == sorted(p.name for p in (split_dir / "shards").glob("*.tar"))
        assert sizes[f"{split}-000000.tar"] == min(n, SHARD)
        captions_by_image = defaultdict(list)
        for path, caption in rows:
            captions_by_image[path].append(caption)
        for key, sample in samples.items():
            assert set(sample) == {"png", "txt", "json"}
            assert sample["png"] == (split_dir / "images" / f"{key}.png").read_bytes()
            meta = json.loads(sample["json"])
            assert meta["key"] == key
            assert sample["txt"].decode().split("\n") == meta["captions"] == captions_by_image[f"images/{key}.png"]


def test_retrieval_and_zeroshot_files(world: tuple[Path, dict]) -> None:
    out, _ = world
    val = out / "val"
    metadata = {key: json.loads(s["json"]) for key, s in _shard_samples(val).items()}
    lines = [json.loads(line) for line in (val / "retrieval.jsonl").read_text().splitlines()]
    assert len(lines) == N_VAL
    for line in lines:
        assert (val / line["image"]).is_file()
        meta = metadata[Path(line["image"]).stem]
        assert len(line["captions"]) == 5 and line["captions"] == meta["captions"]
        assert line["kinds"] == [obj["kind"] for obj in meta["objects"]]

    zeroshot = val / "zeroshot"
    assert json.loads((zeroshot / "classnames.json").read_text()) == list(KINDS)
    assert json.loads((zeroshot / "templates.json").read_text()) == list(ZEROSHOT_TEMPLATES)
    header, rows = _read_tsv(zeroshot / "samples.csv")
    assert header == ["filepath", "label"]
    single = {key: meta["objects"][0]["kind"] for key, meta in metadata.items() if len(meta["objects"]) == 1}
    assert single, "no single-object image in the val split"
    assert {Path(path).stem: KINDS[int(label)] for path, label in rows} == single
    assert all((zeroshot / path).is_file() for path, _ in rows)


def test_metadata_ground_truth(world: tuple[Path, dict]) -> None:
    out, summary = world
    metas = [json.loads(s["json"]) for split in ("train", "val") for s in _shard_samples(out / split).values()]
    for meta in metas:
        assert meta["image_size"] == SIZE and 1 <= len(meta["objects"]) <= 3
        assert meta["background"]["style"] in ("plain", "gradient", "noisy", "textured")
        boxes = []
        for obj in meta["objects"]:
            assert obj["kind"] in KINDS and obj["colour"] in COLOURS and obj["size"] in SIZE_WORDS
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            boxes.append((x0, y0, x1, y1))
        for i, a in enumerate(boxes):  # objects do not overlap
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    kinds = Counter(obj["kind"] for meta in metas for obj in meta["objects"])
    assert sum(summary["splits"][s]["objects_per_kind"][k] for s in ("train", "val") for k in KINDS) == sum(
        kinds.values()
    )


def test_boxes_hold_the_drawn_object() -> None:
    """On plain backgrounds, the pixels that differ from the background fill the box of a single object."""
    checked = 0
    for index in range(300):
        png, meta = render_sample(SEED, "train", index, 64)
        if meta["background"]["style"] != "plain" or len(meta["objects"]) != 1:
            continue
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        ys, xs = np.nonzero(np.abs(pixels - pixels[0, 0]).max(axis=2) > 40)
        x0, y0, x1, y1 = meta["objects"][0]["box"]
        assert abs(xs.min() - x0) <= 1 and abs(ys.min() - y0) <= 1, meta
        assert abs(xs.max() + 1 - x1) <= 1 and abs(ys.max() + 1 - y1) <= 1, meta
        checked += 1
    assert checked >= 20


def _captions_for_scenes(n: int) -> list[tuple[Counter, list[str]]]:
    result = []
    for index in range(n):
        rng = np.random.default_rng([99, index])
        scene = sample_scene(rng, 48)
        result.append((Counter(obj.kind for obj in scene.objects), make_captions(rng, scene)))
    return result


def test_caption_grammar() -> None:
    vocabulary = set(vocabulary_words())
    assert vocabulary_words() == sorted(vocabulary)
    counted = 0
    for kinds, captions in _captions_for_scenes(1500):
        assert len(captions) == len(set(captions)) == 5
        named_with_count = set()
        for caption in captions:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption
            words = caption.split()
            assert set(words) <= vocabulary, caption
            for article, following in zip(words, words[1:]):
                if article in ("a", "an"):
                    assert (article == "an") == (following[0] in "aeiou"), caption
            nouns = [(i, w) for i, w in enumerate(words) if w in NOUN_KIND]
            assert nouns and {NOUN_KIND[w] for _, w in nouns} <= set(kinds), (caption, kinds)
            for i, noun in nouns:
                kind = NOUN_KIND[noun]
                count = kinds[kind]
                numbers = [w for w in words[max(0, i - 2) : i] if w in COUNT_WORDS]
                if noun != kind:  # a plural that differs from the singular
                    assert count > 1 and numbers == [COUNT_WORDS[count - 1]], (caption, kinds)
                elif numbers:
                    assert numbers[-1] in {"one", COUNT_WORDS[count - 1] if kind == "fish" else "one"}, caption
                if count > 1 and numbers and numbers[-1] == COUNT_WORDS[count - 1]:
                    named_with_count.add(kind)
                    counted += 1
        # Some caption names every kind, and every repeated kind with its count.
        assert {k for k, c in kinds.items() if c > 1} <= named_with_count
        assert any({NOUN_KIND[w] for w in c.split() if w in NOUN_KIND} == set(kinds) for c in captions)
    assert counted > 50


def test_zeroshot_templates_use_the_caption_vocabulary() -> None:
    vocabulary = set(vocabulary_words())
    assert 6 <= len(ZEROSHOT_TEMPLATES) <= 10
    for template in ZEROSHOT_TEMPLATES:
        assert template.count("{}") == 1 and "." not in template
        for kind in KINDS:
            assert set(template.format(kind).split()) <= vocabulary


def test_colour_is_independent_of_kind() -> None:
    colours_per_kind: dict[str, set[str]] = defaultdict(set)
    for index in range(800):
        for obj in sample_scene(np.random.default_rng([7, index]), 48).objects:
            colours_per_kind[obj.kind].add(obj.colour)
    assert set(colours_per_kind) == set(KINDS)
    assert all(len(colours) >= 8 for colours in colours_per_kind.values())


def test_cli_generates_and_replaces_a_toy_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world"
    args = ["toyworld", "--out", str(out), "--val", "3", "--image-size", "32", "--workers", "1"]
    assert main([*args, "--train", "6"]) == 0
    assert "6 train and 3 val images" in capsys.readouterr().out
    assert main([*args, "--train", "2"]) == 0
    assert len(list((out / "train" / "images").iterdir())) == 2
    (out / "toyworld.json").unlink()  # as if interrupted
    assert main([*args, "--train", "1"]) == 0
    assert len(list((out / "train" / "images").iterdir())) == 1
    assert commands.DEFAULT_SHARD_SIZE == DEFAULT_SHARD_SIZE


@pytest.mark.parametrize(
    "extra",
    [
        ["--train", "-1"],
        ["--val", "-2"],
        ["--train", "0", "--val", "0"],
        ["--image-size", "4"],
        ["--workers", "0"],
        ["--shard-size", "0"],
    ],
)
def test_cli_rejects_bad_numbers(tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toyworld", "--out", str(tmp_path / "w"), *extra]) == 2
    assert extra[0] in capsys.readouterr().err


def test_cli_rejects_an_out_that_is_a_file_or_a_foreign_directory(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["toyworld", "--out", str(file), "--train", "2", "--val", "0"]) == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    assert main(["toyworld", "--out", str(tmp_path / "foreign"), "--train", "2", "--val", "0"]) == 2
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"
