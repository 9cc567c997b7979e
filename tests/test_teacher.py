"""The labelling pass: nearest-concept search, class means, the embedding cache, views, CLI, torchrun, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F

from clipkd_dino.data.identity import SampleIndex, identity_hashes
from clipkd_dino.data.views import ViewSpec
from clipkd_dino.teacher import TeacherCache, load_class_means, load_labels
from clipkd_dino.teacher.cache import to_numpy
from clipkd_dino.teacher.labels import LABELS_FILE
from clipkd_dino.teacher.class_means import ClassSums, dense_classes, renumber
from clipkd_dino.teacher.search import assign_labels, nearest_concepts
from conftest import REPO, clipkd, torchrun_cli

TEACHER = REPO / "assets" / "toy_teacher.pt"


# ----------------------------------------------------------------------------------------------- search and labels
def test_nearest_concept_score_margin_ties_and_thresholds():
    concepts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    s = 1 / math.sqrt(2)
    images = torch.tensor([[0.8, 0.6], [s, s], [0.0, -1.0], [-0.6, 0.8]])
    nearest = nearest_concepts(images, concepts)
    assert nearest.concept.tolist() == [0, 0, 0, 1]  # row 1 is a tie between 0 and 1: the lower index wins
    assert nearest.score.tolist() == pytest.approx([0.8, s, 0.0, 0.8])
    # runner-ups: 0.6, s (tie), 0.0 (two concepts at 0), 0.6
    assert nearest.margin.tolist() == pytest.approx([0.2, 0.0, 0.0, 0.2], abs=1e-6)
    assert assign_labels(nearest).tolist() == [0, 0, 0, 1]
    assert assign_labels(nearest, min_score=0.75).tolist() == [0, -1, -1, 1]
    assert assign_labels(nearest, min_margin=0.1).tolist() == [0, -1, -1, 1]
    single = nearest_concepts(images[:1], concepts[:1])
    assert single.margin.item() == pytest.approx(0.8 + 1.0)  # a lone concept's runner-up counts as cosine -1


def test_faiss_and_torch_search_give_the_same_labels():
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(1000, 32, generator=generator), dim=-1)
    concepts = F.normalize(torch.randn(50, 32, generator=generator), dim=-1)
    concepts = torch.cat([concepts, concepts[:5]])  # exact duplicates: ties resolved to the lower index by both
    by_torch = nearest_concepts(images, concepts, "torch", chunk_size=128)
    by_faiss = nearest_concepts(images, concepts, "faiss")
    assert torch.equal(by_torch.concept, by_faiss.concept)
    assert torch.allclose(by_torch.score, by_faiss.score, atol=1e-5)
    assert torch.allclose(by_torch.margin, by_faiss.margin, atol=1e-5)


# ----------------------------------------------------------------------------------------------- class means
def test_class_sums_equal_a_direct_computation_and_min_images_renumbers():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(40, 6, generator=generator) * 3
    labels = torch.randint(-1, 5, (40,), generator=generator)
    labels[labels == 3] = 1  # concept 3 gets no image
    labels[:2] = 4
    labels[2:] = torch.where(labels[2:] == 4, torch.tensor(0), labels[2:])  # concept 4: exactly 2 images
    sums = ClassSums(5, 6)
    sums.add(embeddings[:17], labels[:17])
    other = ClassSums(5, 6)
    other.add(embeddings[17:], labels[17:])
    sums.merge(other)
    for concept in range(5):
        mask = labels == concept
        assert int(sums.counts[concept]) == int(mask.sum())
        if mask.any():
            assert torch.allclose(sums.means()[concept], embeddings[mask].mean(0), atol=1e-6)
    kept = dense_classes(sums.counts, min_images=3)
    assert 3 not in kept.tolist() and 4 not in kept.tolist()
    assert kept.tolist() == sorted(kept.tolist())
    dense = renumber(labels, kept, 5)
    for concept, label in zip(labels.tolist(), dense.tolist()):
        assert label == (kept.tolist().index(concept) if concept in kept.tolist() else -1)


def test_kdpp_centre_file_reads_as_class_means(tmp_path):
    path = tmp_path / "centers.json"
    path.write_text(json.dumps({"1": [0.0, 2.0], "0": [1.0, 0.5]}))
    means = load_class_means(path)
    assert means.image.tolist() == [[1.0, 0.5], [0.0, 2.0]]
    path.write_text(json.dumps({"0": [1.0], "2": [0.0]}))
    with pytest.raises(Exception, match="0..C-1"):
        load_class_means(path)


# ----------------------------------------------------------------------------------------------- cache and views
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cache_round_trip(tmp_path, dtype):
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(4, 2, 8, generator=generator)
    texts = torch.randn(8, 8, generator=generator)
    SampleIndex.build(identity_hashes(["s/a", "s/b", "s/c", "t/a"]))[0].save(tmp_path / "samples")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    for name, array in (("images", to_numpy(images, dtype)), ("texts", to_numpy(texts, dtype)),
                        ("caption_offsets", numpy.array([0, 2, 2, 7, 8]))):
        numpy.save(cache_dir / f"{name}.npy", array)
    (cache_dir / "manifest.json").write_text(json.dumps({"dtype": dtype, "views": 2}))
    cache = TeacherCache(tmp_path)
    tolerance = 1e-2 if dtype == "bf16" else 1e-3
    assert len(cache) == 4 and "t/a" in cache and "a" not in cache
    assert torch.allclose(cache.image("s/c", 1), images[2, 1], rtol=tolerance, atol=tolerance)
    assert torch.allclose(cache.image("t/a", 0), images[3, 0], rtol=tolerance, atol=tolerance)
    assert cache.texts("s/b").shape == (0, 8)
    assert torch.allclose(cache.texts("s/c"), texts[2:7], rtol=tolerance, atol=tolerance)
    with pytest.raises(KeyError, match="'a'"):
        cache.image("a", 0)
    ids = identity_hashes(["t/a", "s/a", "s/b", "nope"])
    assert cache.covered(ids, numpy.array([0, 1, 0, 0])).tolist() == [True, True, False, False]  # s/b: no caption
    image, text = cache.lookup(ids[:2], numpy.array([1, 0]), numpy.array([0, 1]))
    assert torch.allclose(image, torch.stack([images[3, 1], images[0, 0]]), rtol=tolerance, atol=tolerance)
    assert torch.allclose(text, torch.stack([texts[7], texts[1]]), rtol=tolerance, atol=tolerance)
    with pytest.raises(KeyError, match="1 samples"):
        cache.lookup(ids[2:3], numpy.array([0]), numpy.array([0]))


def test_views_are_a_pure_function_of_seed_key_and_index():
    spec = ViewSpec(size=32, scale=(0.3, 1.0), hflip=0.5, seed=3)
    boxes = [spec.box("key-1", k, 64, 48) for k in range(20)]
    assert boxes == [spec.box("key-1", k, 64, 48) for k in range(20)]
    assert len(set(boxes)) > 10 and {b.flip for b in boxes} == {True, False}
    assert boxes != [spec.box("key-2", k, 64, 48) for k in range(20)]
    assert boxes != [ViewSpec(size=32, scale=(0.3, 1.0), hflip=0.5, seed=4).box("key-1", k, 64, 48)
                     for k in range(20)]
    for box in boxes:
        assert 0 <= box.top and box.top + box.height <= 48 and 0 <= box.left and box.left + box.width <= 64
        assert 0.3 * 64 * 48 * 0.9 <= box.height * box.width <= 64 * 48


# ----------------------------------------------------------------------------------------------- the pass, end to end
def _kinds_pool(path: Path) -> Path:
    from clipkd_dino.toyworld.generate import KINDS

    path.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": k, "count": 100 - i} for i, k in enumerate(KINDS)]}))
    return path


def _label_args(toyworld_dir: Path, out: Path, pool: Path, *extra: str) -> list[str]:
    return ["label", "--teacher", "toy-teacher", "--teacher-pretrained", str(TEACHER), "--concepts", str(pool),
            "--data", str(toyworld_dir / "train" / "shards"), "--out", str(out),
            "--templates", str(toyworld_dir / "val" / "zeroshot" / "templates.json"), "--workers", "0",
            "--batch-size", "40", "--device", "cpu", *extra]


def _label(toyworld_dir: Path, out: Path, pool: Path, *extra: str, nproc: int = 1, nodes: int = 1):
    args = _label_args(toyworld_dir, out, pool, *extra)
    result = torchrun_cli(nproc, *args, nodes=nodes) if nproc > 1 else clipkd(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def labelled(toyworld_dir, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("labelled")
    pool = _kinds_pool(tmp / "pool.json")
    out = tmp / "out"
    _label(toyworld_dir, out, pool, "--cache-views", "2", "--min-images", "3", "--crop-scale", "0.5", "1.0",
           "--hflip", "0.5")
    return out, pool


def test_class_means_and_labels_match_plain_open_clip(labelled, toyworld_dir):
    """Recompute the teacher's eval-view embeddings with plain open_clip: labels, scores and class means agree."""
    import open_clip
    from PIL import Image

    from clipkd_dino.toyworld.generate import KINDS
    from clipkd_dino.models import get_tokenizer

    out, _ = labelled
    labels = load_labels(out)
    assert len(labels) == 96 and labels.keys[0] == "shards/train-0000000" and labels.keys[-1] == "shards/train-0000095"
    model, _, preprocess = open_clip.create_model_and_transforms("toy-teacher", pretrained=str(TEACHER))
    model.eval()
    images = torch.stack([preprocess(Image.open(toyworld_dir / "train" / "images" / f"{key.split('/')[-1]}.png"))
                          for key in labels.keys])
    templates = json.loads((toyworld_dir / "val" / "zeroshot" / "templates.json").read_text())
    with torch.no_grad():
        features = model.encode_image(images)
        tokens = get_tokenizer("toy-teacher")([t.replace("{}", k) for k in KINDS for t in templates])
        text = F.normalize(model.encode_text(tokens), dim=-1).view(len(KINDS), len(templates), -1)
    classifier = F.normalize(text.mean(1), dim=-1)
    scores = F.normalize(features, dim=-1) @ classifier.T
    nearest = [KINDS[i] for i in scores.argmax(1).tolist()]
    assert labels.nearest == nearest
    assert torch.allclose(labels.scores, scores.max(1).values, atol=1e-5)
    assert labels.class_means.shape == (len(labels.concepts), features.shape[1])
    for label, name in enumerate(labels.concepts):
        members = [i for i, n in enumerate(nearest) if n == name]
        assert len(members) >= 3 and int(labels.counts[label]) == len(members)
        assert torch.allclose(labels.class_means[label], features[members].mean(0), atol=1e-5)
        assert (labels.labels[members] == label).all()
    dropped = [i for i, n in enumerate(nearest) if n not in labels.concepts]
    assert (labels.labels[dropped] == -1).all()
    assert labels.text_class_means.shape == labels.class_means.shape
    assert labels.label_of(["shards/train-0000005", "train-0000005"]).tolist() == [int(labels.labels[5]), -1]


def test_replayed_view_gives_the_cached_embedding(labelled, toyworld_dir):
    import open_clip
    from PIL import Image

    from clipkd_dino.models.factory import image_normalisation
    from clipkd_dino.models import get_tokenizer

    out, _ = labelled
    cache = TeacherCache(out)
    manifest = cache.manifest
    assert manifest["views"] == 2 and manifest["teacher"] == "toy-teacher" and len(cache) == 96
    model = open_clip.create_model("toy-teacher", pretrained=str(TEACHER)).eval()
    mean, std = image_normalisation(model)
    spec = ViewSpec(size=48, scale=(0.5, 1.0), hflip=0.5, mean=mean, std=std, seed=0)
    assert spec.describe() == manifest["view_spec"]
    key = "shards/train-0000007"
    image = Image.open(toyworld_dir / "train" / "images" / "train-0000007.png")
    with torch.no_grad():
        replayed = model.encode_image(torch.stack([spec(image, key, k) for k in range(2)]))
        captions = (toyworld_dir / "train" / "captions.csv").read_text().splitlines()
        mine = [line.split("\t")[1] for line in captions if "train-0000007.png" in line]
        texts = model.encode_text(get_tokenizer("toy-teacher")(mine))
    for k in range(2):
        assert torch.allclose(cache.image(key, k), replayed[k], rtol=2e-3, atol=2e-3)
    assert not torch.allclose(cache.image(key, 0), cache.image(key, 1), atol=1e-3)
    assert torch.allclose(cache.texts(key), texts, rtol=2e-3, atol=2e-3)


def test_torchrun_two_processes_equal_one(labelled, toyworld_dir, tmp_path):
    """Two processes on two "nodes" (two torchrun agents, c10d rendezvous): the merged output equals one
    process's."""
    out, pool = labelled
    two = tmp_path / "two"
    _label(toyworld_dir, two, pool, "--cache-views", "2", "--min-images", "3", "--crop-scale", "0.5", "1.0",
           "--hflip", "0.5", nproc=2, nodes=2)
    one_labels, two_labels = load_labels(out), load_labels(two)
    assert one_labels.keys == two_labels.keys
    assert torch.equal(one_labels.labels, two_labels.labels)
    assert one_labels.concepts == two_labels.concepts
    assert torch.allclose(one_labels.class_means, two_labels.class_means, atol=1e-6)
    assert torch.allclose(one_labels.text_class_means, two_labels.text_class_means, atol=1e-6)
    assert torch.allclose(TeacherCache(out).image("shards/train-0000050", 1),
                          TeacherCache(two).image("shards/train-0000050", 1))


def test_a_killed_pass_resumes_without_redoing_finished_units(labelled, toyworld_dir, tmp_path):
    import shutil

    out, pool = labelled
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    parts = sorted((copy / "parts").glob("*.safetensors"))
    assert len(parts) == 3  # three shards
    (copy / "parts" / parts[1].name).unlink()  # as if killed while the second shard was being labelled
    (copy / LABELS_FILE).unlink()
    kept_mtime = parts[0].stat().st_mtime_ns
    _label(toyworld_dir, copy, pool, "--cache-views", "2", "--min-images", "3", "--crop-scale", "0.5", "1.0",
           "--hflip", "0.5")
    assert parts[0].stat().st_mtime_ns == kept_mtime
    assert (copy / "parts" / parts[1].name).is_file()
    assert (copy / LABELS_FILE).read_bytes() == (out / LABELS_FILE).read_bytes()
    # other settings: every unit is redone
    _label(toyworld_dir, copy, pool, "--cache-views", "2", "--min-margin", "0.05")
    assert parts[0].stat().st_mtime_ns != kept_mtime
    relabelled = load_labels(copy)
    assert (relabelled.labels[relabelled.margins < 0.05] == -1).all()
    assert (relabelled.labels[relabelled.margins >= 0.05] >= 0).all()


def test_sigterm_keeps_finished_units_and_the_rerun_labels_the_rest(labelled, toyworld_dir, tmp_path, monkeypatch):
    import os
    import signal

    from clipkd_dino.teacher.label_pass import LabelPass

    out, pool = labelled
    settings = ("--cache-views", "2", "--min-images", "3", "--crop-scale", "0.5", "1.0", "--hflip", "0.5")
    args = _label_args(toyworld_dir, tmp_path / "out", pool, *settings, "--batch-size", "8")
    label_batch, batches = LabelPass._label_batch, []

    def sigterm_after_the_fifth(self, batch, pending):  # the first shard's 32 samples, then 7 of the second
        label_batch(self, batch, pending)
        batches.append(len(batch.samples))
        if len(batches) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(LabelPass, "_label_batch", sigterm_after_the_fifth)
    stopped = clipkd(*args)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    message = stopped.stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM after 1 of 3 data units" in message and "run the same command again" in message
    written = [p.stem for p in (tmp_path / "out" / "parts").glob("*.json")]
    assert len(batches) == 5 and written == ["shards~train-000000"]
    assert not (tmp_path / "out" / LABELS_FILE).exists()
    monkeypatch.undo()
    kept = (tmp_path / "out" / "parts" / "shards~train-000000.safetensors").stat().st_mtime_ns
    assert clipkd(*args).returncode == 0
    assert (tmp_path / "out" / "parts" / "shards~train-000000.safetensors").stat().st_mtime_ns == kept
    resumed, reference = load_labels(tmp_path / "out"), load_labels(out)
    assert resumed.keys == reference.keys and torch.equal(resumed.labels, reference.labels)
    torch.testing.assert_close(resumed.scores, reference.scores, atol=2e-6, rtol=0)


def test_a_full_disk_keeps_the_finished_units_and_the_rerun_completes(labelled, toyworld_dir, tmp_path, monkeypatch):
    import errno

    import clipkd_dino.teacher.label_pass as label_pass

    out, pool = labelled
    args = _label_args(toyworld_dir, tmp_path / "out", pool, "--cache-views", "2", "--min-images", "3",
                       "--crop-scale", "0.5", "1.0", "--hflip", "0.5")
    real_write, parts = label_pass.write_atomic, []

    def disk_fills_up(path, write):
        parts.append(path.name)
        if len(parts) < 3:  # the first unit's cache part and part
            return real_write(path, write)

        def half(stream):
            stream.write(b"half a part")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, half)

    monkeypatch.setattr(label_pass, "write_atomic", disk_fills_up)
    full = clipkd(*args)
    assert full.returncode == 2 and len(full.stderr.strip().splitlines()[-1:]) == 1
    assert "shards~train-000001.cache.safetensors: No space left on device; the file there before" in full.stderr
    written = sorted(p.name for p in (tmp_path / "out" / "parts").iterdir())
    assert written == ["shards~train-000000.cache.safetensors", "shards~train-000000.json",
                       "shards~train-000000.safetensors"]  # no torn or temporary file
    monkeypatch.undo()
    assert clipkd(*args).returncode == 0
    assert (tmp_path / "out" / LABELS_FILE).read_bytes() == (out / LABELS_FILE).read_bytes()
    assert not list((tmp_path / "out" / "parts").glob("*.cache.safetensors"))  # merged into cache/, then dropped


def test_stats_report_precision_against_toyworld_truth(labelled):
    out, _ = labelled
    result = clipkd("label", "stats", str(out))
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    truth = stats["ground_truth"]
    assert truth["images"] == 96
    labels = load_labels(out)
    single = [i for i, t in enumerate(labels.truth) if "," not in t]
    right = sum(labels.nearest[i] == labels.truth[i] for i in single)
    assert truth["precision_nearest_single_object"] == pytest.approx(100 * right / len(single), abs=0.01)
    curve = truth["precision_vs_coverage"]
    assert [p["coverage"] for p in curve][-1] == 1.0 and curve[-1]["precision"] == truth["precision_nearest_all"]
    assert (out / "stats.png").stat().st_size > 10_000
    assert "against ground truth" in result.stdout


def test_csv_source_groups_captions_by_image(toyworld_dir, tmp_path):
    pool = _kinds_pool(tmp_path / "pool.json")
    _label(toyworld_dir, tmp_path / "csv", pool, "--cache-views", "1", "--data",
           str(toyworld_dir / "train" / "captions.csv"))
    labels = load_labels(tmp_path / "csv")
    assert len(labels) == 96 and labels.keys[0] == "captions/images/train-0000000.png"
    cache = TeacherCache(tmp_path / "csv")
    assert cache.texts("captions/images/train-0000000.png").shape[0] == 5


def test_bad_arguments_fail_in_one_line(toyworld_dir, tmp_path):
    result = clipkd("label", "--teacher", "toy-teacher", "--concepts", str(tmp_path / "missing.json"),
                     "--data", str(toyworld_dir / "train" / "shards"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "missing.json" in result.stderr and len(result.stderr.splitlines()) == 1
    result = clipkd("label", "--teacher", "toy-teacher")
    assert result.returncode == 2 and "--concepts is required" in result.stderr


def test_fresh_toyworld_pool_top16_are_the_kinds_and_labels_are_right(tmp_path):
    """The chain a user runs: captions -> pool -> labels, on toyworld images the teacher never saw (seed 5)."""
    from clipkd_dino.concepts.build import BuildOptions, build_pool
    from clipkd_dino.toyworld.generate import KINDS, generate
    from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset
    from clipkd_dino.teacher.stats import label_stats

    data = tmp_path / "fresh"
    generate(data, n_train=600, n_val=8, image_size=64, seed=5, workers=1, shard_size=300)
    pool = tmp_path / "pool.json"
    build_pool([str(data / "train" / "shards")], BuildOptions(phrases=True, top_k=16)).save(pool)
    label_dataset(LabelSettings(teacher="toy-teacher", teacher_pretrained=str(TEACHER), concepts=str(pool),
                                data=str(data / "train" / "shards"), out=str(tmp_path / "labels"), top_k=16,
                                templates=str(data / "val" / "zeroshot" / "templates.json"), workers=0,
                                device="cpu"))
    labels = load_labels(tmp_path / "labels")
    assert sorted(labels.concepts) == sorted(KINDS)
    truth = label_stats(tmp_path / "labels")["ground_truth"]
    assert truth["precision_nearest_single_object"] >= 85.0


def test_unreadable_and_missing_images_are_skipped_and_counted(toyworld_dir, tmp_path):
    good = toyworld_dir / "train" / "images" / "train-0000001.png"
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [f"{good}\ta red square", f"{tmp_path / 'missing.png'}\ta blue circle",
            f"{tmp_path / 'corrupt.png'}\ta green star", f"{good}\ta second caption"]
    (tmp_path / "data.csv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    pool = _kinds_pool(tmp_path / "pool.json")
    _label(toyworld_dir, tmp_path / "out", pool, "--data", str(tmp_path / "data.csv"), "--cache-views", "1")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == {"missing_image": 1, "bad_image": 1} and summary["samples"] == 1
    assert load_labels(tmp_path / "out").keys == [f"data/{good}"]
    assert TeacherCache(tmp_path / "out").texts(f"data/{good}").shape[0] == 2
