"""Sample identity across joined sources: two toyworld sets with the same key strings keep their own labels and
teacher embeddings; a key repeated within a source, labels and caches of other passes, uncovered shards are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from clipkd_dino.data.identity import SampleIndex, identity_hashes, shard_sources, source_names
from clipkd_dino.errors import ConfigError, UserError
from conftest import REPO

TEACHER = REPO / "assets" / "toy_teacher.pt"


def test_sources_are_named_by_the_shortest_distinguishing_folder_tail():
    assert source_names(["/data/cc3m", "/data/cc12m"]) == {"/data/cc3m": "cc3m", "/data/cc12m": "cc12m"}
    assert source_names(["/x/a/train", "/x/b/train"]) == {"/x/a/train": "a/train", "/x/b/train": "b/train"}
    assert source_names(["/moved/elsewhere/cc3m"]) == {"/moved/elsewhere/cc3m": "cc3m"}
    shards = shard_sources(["/d/cc3m/00000.tar", "/d/cc12m/00000.tar", "/d/cc3m/00001.tar"])
    assert [s.name for s in shards] == ["cc3m/00000", "cc12m/00000", "cc3m/00001"]


def test_sample_index_finds_rows_and_reports_repeated_identities(tmp_path):
    hashes = identity_hashes(["a/1", "b/1", "a/2", "b/1"])
    index, duplicates = SampleIndex.build(hashes)
    assert duplicates == [(1, 3)]
    index, duplicates = SampleIndex.build(hashes[:3])
    index.save(tmp_path)
    loaded = SampleIndex.load(tmp_path)
    assert loaded.lookup(identity_hashes(["a/2", "c/9", "a/1", "b/1"])).tolist() == [2, -1, 0, 1]
    assert not duplicates and len(loaded) == 3


@pytest.fixture(scope="module")
def joined(tmp_path_factory) -> tuple[Path, str, Path]:
    """Two toyworld sets drawn with different seeds (so the same key strings), joined with '::', labelled with a
    one-view cache: (root, data string, labelling output)."""
    from clipkd_dino.toyworld.generate import KINDS, generate
    from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset

    root = tmp_path_factory.mktemp("joined")
    for name, seed in (("a", 0), ("b", 1)):
        generate(root / name, n_train=32, n_val=4, image_size=48, seed=seed, workers=1, shard_size=16)
    pool = root / "pool.json"
    pool.write_text(json.dumps({"format": "clipkd-concept-pool", "version": 1,
                                "concepts": [{"concept": k, "count": 1} for k in KINDS]}))
    data = f"{root / 'a' / 'train' / 'shards'}::{root / 'b' / 'train' / 'shards'}"
    label_dataset(LabelSettings(teacher="toy-teacher", teacher_pretrained=str(TEACHER), concepts=str(pool), data=data,
                                out=str(root / "out"),
                                templates=str(root / "a" / "val" / "zeroshot" / "templates.json"),
                                cache_views=1, crop_scale=[0.5, 1.0], workers=0, device="cpu", batch_size=24))
    return root, data, root / "out"


def _own_image(root: Path, identity: str) -> Image.Image:
    source, _, key = identity.partition("/train/shards/")
    return Image.open(root / source / "train" / "images" / f"{key}.png")


def test_each_sample_keeps_its_own_cached_embedding_and_label(joined):
    import open_clip

    from clipkd_dino.models import image_transforms
    from clipkd_dino.teacher import TeacherCache, load_labels

    root, _, out = joined
    labels, cache = load_labels(out), TeacherCache(out)
    assert len(labels) == 64 and len(cache) == 64
    assert labels.keys[0] == "a/train/shards/train-0000000" and labels.keys[32] == "b/train/shards/train-0000000"
    model = open_clip.create_model("toy-teacher", pretrained=str(TEACHER)).eval()
    preprocess = image_transforms(model, augment=False)[1]
    views = TeacherCache(out).manifest["view_spec"]
    from clipkd_dino.data.views import ViewSpec

    spec = ViewSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in views.items()
                       if k not in ("kind", "interpolation")})
    images = [_own_image(root, identity) for identity in labels.keys]
    with torch.no_grad():
        replayed = model.encode_image(torch.stack([spec(image, identity, 0)
                                                   for image, identity in zip(images, labels.keys)]))
        plain = model.encode_image(torch.stack([preprocess(image) for image in images]))
    cached = torch.stack([cache.image(identity, 0) for identity in labels.keys])
    torch.testing.assert_close(cached, replayed, rtol=2e-3, atol=2e-3)
    # the two sets' samples with the same key string differ, so a mix-up could not pass the check above
    assert not torch.allclose(cached[:32], cached[32:], atol=1e-2)
    from clipkd_dino.toyworld.generate import KINDS
    from clipkd_dino.eval.zeroshot import zeroshot_classifier
    from clipkd_dino.models import get_tokenizer

    templates = json.loads((root / "a" / "val" / "zeroshot" / "templates.json").read_text())
    concepts = zeroshot_classifier(model, get_tokenizer("toy-teacher"), list(KINDS), templates, "cpu")
    scores = F.normalize(plain, dim=-1) @ concepts
    assert labels.nearest == [KINDS[i] for i in scores.argmax(1).tolist()]
    torch.testing.assert_close(labels.scores, scores.max(1).values, atol=1e-5, rtol=0)
    assert labels.nearest[:32] != labels.nearest[32:]  # the two sets' images differ


def test_the_training_stream_serves_each_sample_its_own_teacher_embedding_and_label(joined):
    from clipkd_dino.config import DataConfig
    from clipkd_dino.data.pairs import PairImages, TrainData
    from clipkd_dino.distill.teachers import BatchTargets, CachedTeacher, OnlineTeacher
    from clipkd_dino.models import create_model, get_tokenizer
    from clipkd_dino.teacher import load_labels

    root, data, out = joined
    student = create_model("toy-student")
    cached = CachedTeacher(str(out), student)
    labels = load_labels(out)
    online = OnlineTeacher("toy-teacher", str(TEACHER), "fp32", torch.device("cpu"), student)
    config = DataConfig(train=data, num_samples=64, workers=0, shuffle_buffer=64)
    stream = TrainData(config, PairImages(None, cached.views, cached.num_views), get_tokenizer("toy-student"),
                       batch_size=32, seed=3, targets=BatchTargets(cached.cache, labels))
    seen_sources = set()
    for batch in stream.epoch_batches(0):
        seen_sources |= {key.split("/")[0] for key in batch["keys"]}
        image, _ = online.features(batch)
        torch.testing.assert_close(batch["teacher_image"], image, rtol=2e-3, atol=2e-3)
        assert torch.equal(batch["labels"], labels.label_of(batch["keys"]))
    assert seen_sources == {"a", "b"}


def test_a_key_repeated_within_a_source_is_refused_naming_both_shards(joined, tmp_path):
    from clipkd_dino.teacher.label_pass import LabelSettings, label_dataset

    root, _, _ = joined
    shards = tmp_path / "dup"
    shards.mkdir()
    for name in ("x-000000.tar", "x-000001.tar"):  # the same samples under two shard names, in one folder
        shutil.copy(root / "a" / "train" / "shards" / "train-000000.tar", shards / name)
    with pytest.raises(UserError, match=r"'dup/train-[0-9]+' appears twice in one data source: in dup/x-000000 "
                                        r"and in dup/x-000001"):
        label_dataset(LabelSettings(teacher="toy-teacher", teacher_pretrained=str(TEACHER),
                                    concepts=str(root / "pool.json"), data=str(shards), out=str(tmp_path / "out"),
                                    templates=str(root / "a" / "val" / "zeroshot" / "templates.json"), workers=0,
                                    device="cpu"))


def _distill_config(tmp_path: Path, data: str, **distill) -> "object":
    from clipkd_dino.config import load_config

    raw = {"model": {"name": "toy-student"}, "data": {"train": data, "num_samples": 64},
           "train": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
           "distill": {"teacher": "toy-teacher", "weights": {"dino": 1.0}, **distill}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_labels_cache_and_teacher_of_other_passes_are_refused_in_one_line(joined, tmp_path):
    from clipkd_dino.distill import build_objective, check_distill
    from clipkd_dino.models import create_model

    root, data, out = joined
    check_distill(_distill_config(tmp_path, data, cache=str(out), labels=str(out)))  # one pass: accepted
    other = tmp_path / "other"
    shutil.copytree(out, other)
    sidecar = json.loads((other / "class_means.json").read_text())
    (other / "class_means.json").write_text(json.dumps(sidecar | {"pool_sha256": "f" * 64}))
    with pytest.raises(ConfigError, match=r"distill.cache \(.*\) and distill.labels \(.*other\) disagree on the "
                                          r"concept pool") as error:
        check_distill(_distill_config(tmp_path, data, cache=str(out), labels=str(other)))
    assert "\n" not in str(error.value)
    weights = torch.load(TEACHER, weights_only=True)
    state = weights.get("state_dict", weights)
    first = next(name for name, value in state.items() if value.is_floating_point())
    state[first] = state[first] + 1.0
    retrained = tmp_path / "retrained.pt"
    torch.save(weights, retrained)
    student = create_model("toy-student")
    online = _distill_config(tmp_path, data, labels=str(out), teacher_pretrained=str(retrained))
    check_distill(online)  # the online teacher's weights are compared once it is loaded, before training
    with pytest.raises(ConfigError, match=r"distill.labels .* and distill.teacher .*retrained.pt\) disagree on the "
                                          r"teacher weights"):
        build_objective(online, student, torch.device("cpu"))
    build_objective(_distill_config(tmp_path, data, labels=str(out), teacher_pretrained=str(TEACHER)), student,
                    torch.device("cpu"))


def test_shards_the_labels_do_not_cover_are_refused_and_missing_samples_skipped(joined, tmp_path):
    from clipkd_dino.distill import check_distill
    from clipkd_dino.distill.teachers import BatchTargets
    from clipkd_dino.teacher import TeacherCache, load_labels

    root, data, out = joined
    extra = root / "c" / "train" / "shards"
    extra.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "a" / "train" / "shards" / "train-000000.tar", extra / "train-000000.tar")
    with pytest.raises(ConfigError, match=r"1 of 5 shards of data.train were not labelled in .*'c/train/shards/"
                                          r"train-000000'"):
        check_distill(_distill_config(tmp_path, f"{data}::{extra}", cache=str(out)))
    labels, cache = load_labels(out), TeacherCache(out)
    keys = ["a/train/shards/train-0000001", "c/train/shards/train-0000001", "b/train/shards/train-0000002"]
    batch = {"images": torch.zeros(3, 3, 4, 4), "texts": torch.zeros(3, 5, dtype=torch.long), "keys": keys,
             "ids": torch.from_numpy(identity_hashes(keys)), "caption_index": torch.tensor([0, 0, 9]),
             "view": torch.tensor([0, 0, 0]), "skipped": {"bad_image": 1}}
    served = BatchTargets(cache, labels)(batch)
    assert served["keys"] == keys[:1] and served["images"].shape[0] == 1
    assert served["skipped"] == {"bad_image": 1, "not_labelled": 1, "not_in_cache": 1}  # b's caption 9 is not cached
    assert torch.equal(served["teacher_image"], cache.image(keys[0], 0)[None])
    assert served["labels"].tolist() == labels.label_of(keys[:1]).tolist()
    assert numpy.array_equal(served["ids"].numpy(), identity_hashes(keys[:1]))


def test_the_student_sees_its_own_resolution_and_normalisation(joined, monkeypatch):
    """From the cache, a student at another resolution and normalisation than the teacher's gets the cached crops
    at its own input; the pixels travel as uint8 and each model normalises them with its own mean and std."""
    import open_clip

    from clipkd_dino.config import DataConfig
    from clipkd_dino.data.pairs import PairImages, TrainData
    from clipkd_dino.distill.teachers import CachedTeacher, OnlineTeacher
    from clipkd_dino.models import create_model, get_tokenizer, model_config
    from clipkd_dino.models.factory import PixelNormaliser, image_normalisation

    root, data, out = joined
    config = model_config("toy-student")
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "toy-student-32",
                        {**config, "vision_cfg": {**config["vision_cfg"], "image_size": 32}})
    student = create_model("toy-student-32")
    student.visual.image_mean, student.visual.image_std = (0.5,) * 3, (0.25,) * 3
    cached = CachedTeacher(str(out), student)
    assert (cached.views.size, cached.views.mean, cached.views.std) == (32, (0.5,) * 3, (0.25,) * 3)
    stream = TrainData(DataConfig(train=data, num_samples=64, workers=0), PairImages(None, cached.views, 1),
                       get_tokenizer("toy-student"), batch_size=8, seed=0)
    batch = next(iter(stream.epoch_batches(0)))
    assert batch["images"].shape[1:] == (3, 32, 32)
    assert batch["images"].dtype == torch.uint8  # normalised on the device, by whoever reads them
    same_size = create_model("toy-student")
    same_size.visual.image_mean, same_size.visual.image_std = (0.5,) * 3, (0.25,) * 3
    online = OnlineTeacher("toy-teacher", str(TEACHER), "fp32", torch.device("cpu"), same_size)
    pixels = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in image_normalisation(online.model))
    with torch.no_grad():
        expected = online.model.encode_image((pixels / 255 - mean) / std)
    image, _ = online.features({"images": pixels, "texts": torch.zeros(2, 32, dtype=torch.long)})
    torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4)
    student_input = PixelNormaliser(same_size)(pixels)
    torch.testing.assert_close(student_input, (pixels / 255 - 0.5) / 0.25)
