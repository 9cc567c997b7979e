"""Every data-reading command on a corrupted copy of toyworld (and on real photos with real captions): it completes
with the exact count of each planted fault, and `--max-bad-fraction` stops it in one line.

The commands run through the CLI's entry point (`clipkd_dino.cli.main`, argv to exit code) in this process, as
tests/test_eval_formats.py does: a new interpreter per run (`run_cli`) costs seconds of imports each. One test runs
`clipkd label` as a process, to check the exit code and the one-line error a user sees.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO, SHARED, clipkd, run_cli

from .conftest import (CSV_CAPTION_FAULTS, CSV_FAULTS, JSONL_FAULTS, SHARD_CAPTION_FAULTS, SHARD_FAULTS, Planted,
                       garbled_jpeg, plant_csv, truncated)

TEACHER = ["--teacher", "toy-teacher", "--teacher-pretrained", str(REPO / "assets" / "toy_teacher.pt")]
EVAL_MODEL = ["--model", "toy-teacher", "--pretrained", str(REPO / "assets" / "toy_teacher.pt")]
COCO_CAPTIONS = SHARED / "data" / "coco" / "captions_val2017.json"


def assert_stopped(result, command: str) -> None:
    """Exit 2 and a one-line error (after any progress bar) naming the fraction."""
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert last.startswith(f"clipkd {command}: error: ") and "max_bad_fraction" in last, result.stderr[-2000:]


def label_args(planted: Planted, data: Path, out: Path, *extra: str) -> list[str]:
    return ["label", *TEACHER, "--concepts", str(planted.pool), "--data", str(data), "--out", str(out),
            "--templates", str(planted.templates), "--workers", "0", "--device", "cpu", *extra]


def label(planted: Planted, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return clipkd(*label_args(planted, data, out, *extra))


def evaluate(out: Path, *data: str) -> subprocess.CompletedProcess:
    return clipkd("eval", *EVAL_MODEL, *data, "--out", str(out), "--workers", "0", "--device", "cpu", "--no-cache",
                  "--search", "torch")


# ---------------------------------------------------------------------------------------------------- concepts
def test_concepts_build_counts_every_caption_fault(planted, tmp_path):
    result = clipkd("concepts", "build", str(planted.csv), str(planted.shards), "--out", str(tmp_path / "pool.json"),
                    "--min-count", "1", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads((tmp_path / "pool.json").read_text())["stats"]
    assert stats["skipped"] == dict(Counter(CSV_CAPTION_FAULTS) + Counter(SHARD_CAPTION_FAULTS))
    assert "skipped: empty 1, invalid_utf8 2, missing_caption 1, empty_file 1, not_a_tar 1, truncated_shard 1" in (
        result.stderr)


def test_concepts_build_stops_past_max_bad_fraction(planted, tmp_path):
    result = clipkd("concepts", "build", str(planted.csv), "--out", str(tmp_path / "pool.json"), "--no-progress",
                    "--max-bad-fraction", "0.1")
    assert_stopped(result, "concepts")
    assert "2 of 16 samples were bad" in result.stderr and not (tmp_path / "pool.json").exists()


# ---------------------------------------------------------------------------------------------------- label
@pytest.mark.parametrize("source", ["csv", "shards"])
def test_label_counts_every_fault(planted, tmp_path, source):
    data, good, faults = {"csv": (planted.csv, planted.csv_good, CSV_FAULTS),
                          "shards": (planted.shards, planted.shards_good, SHARD_FAULTS)}[source]
    result = label(planted, data, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == faults and summary["samples"] == good
    assert summary["seen"] == good + sum(faults.values())
    assert f"{sum(faults.values())} skipped (" in result.stdout


def test_label_stops_past_max_bad_fraction(planted, tmp_path):
    result = run_cli(*label_args(planted, planted.csv, tmp_path / "out", "--max-bad-fraction", "0.25"))
    assert_stopped(result, "label")
    assert "6 of 16 samples were bad" in result.stderr and not (tmp_path / "out" / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("source", ["csv", "shards", "jsonl"])
def test_eval_skip_bad_counts_every_fault(planted, tmp_path, source):
    option, data, good, faults = {"csv": ("--pairs", planted.csv, planted.csv_good, CSV_FAULTS),
                                  "shards": ("--pairs", planted.shards, planted.shards_good, SHARD_FAULTS),
                                  "jsonl": ("--retrieval", planted.jsonl, planted.jsonl_good, JSONL_FAULTS)}[source]
    result = evaluate(tmp_path / "m.json", option, str(data), "--skip-bad")
    assert result.returncode == 0, result.stderr[-2000:]
    retrieval = json.loads((tmp_path / "m.json").read_text())["retrieval"]
    assert retrieval["skipped"] == faults and retrieval["num_images"] == good
    assert f"retrieval: {sum(faults.values())} skipped (" in result.stdout


def test_eval_without_skip_bad_names_the_first_fault(planted, tmp_path):
    result = evaluate(tmp_path / "m.json", "--pairs", str(planted.shards))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "shard-1.tar: sample" in result.stderr and "--skip-bad" in result.stderr


def test_eval_stops_past_max_bad_fraction(planted, tmp_path):
    result = evaluate(tmp_path / "m.json", "--pairs", str(planted.csv), "--skip-bad", "--max-bad-fraction", "0.2")
    assert_stopped(result, "eval")
    assert "6 of 16 samples were bad" in result.stderr
    result = evaluate(tmp_path / "m.json", "--pairs", str(planted.csv), "--max-bad-fraction", "0.2")
    assert result.returncode == 2 and "needs --skip-bad" in result.stderr


# ---------------------------------------------------------------------------------------------------- train
def train_config(tmp_path: Path, data: Path, **data_options) -> Path:
    """A one-epoch toy-student run on `data` (batches of 4), writing to tmp_path/run."""
    config = {"model": {"name": "toy-student"},
              "data": {"train": str(data), "workers": 0, "augment": False, **data_options},
              "optim": {"warmup_steps": 1, "lr": 1e-3},
              "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "output_dir": str(tmp_path / "run"),
                        "log_every_steps": 1, "eval_every_epochs": 0}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def teacher_overrides(planted: Planted, data: Path, tmp_path: Path, mode: str) -> list[str]:
    """Config overrides that distil from the toy teacher: "online", or "cached" (label with a 1-view cache)."""
    if mode == "none":
        return []
    labels = tmp_path / "labels"
    result = label(planted, data, labels, *(["--cache-views", "1"] if mode == "cached" else []))
    assert result.returncode == 0, result.stderr[-2000:]
    source = f"distill.cache={labels}" if mode == "cached" else f"distill.teacher_pretrained={TEACHER[-1]}"
    return ["distill.teacher=toy-teacher", f"distill.labels={labels}", source]


@pytest.mark.parametrize("teacher", ["none", "cached", "online"])
def test_train_counts_every_csv_fault(planted, tmp_path, teacher):
    overrides = teacher_overrides(planted, planted.csv, tmp_path, teacher)
    result = clipkd("train", str(train_config(tmp_path, planted.csv)), *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == CSV_FAULTS and summary["seen_samples"] == planted.csv_good + 6
    if teacher != "none":
        assert "loss_dino" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("teacher", ["none", "online"])
def test_train_counts_every_shard_fault_at_each_visit(planted, tmp_path, teacher):
    """Shards are drawn with replacement and read in order (no shuffle buffer), so each fault is counted once per
    visit of its shard: shard-1's five spoiled samples (its first five) in order, the last visit maybe cut short by
    the end of the epoch; every broken shard at least once in 200 samples."""
    overrides = teacher_overrides(planted, planted.shards, tmp_path, teacher)
    config = train_config(tmp_path, planted.shards, num_samples=200, shuffle_buffer=1)
    result = clipkd("train", str(config), *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    skipped = summary["skipped_samples"]
    assert set(skipped) == set(SHARD_FAULTS)
    # shard-1's samples 0, 1, 2 and 4 (sample 3's empty image shares empty_file with the empty shard-4)
    visits = [skipped["bad_image"], skipped["missing_caption"], skipped["invalid_utf8"], skipped["missing_image"]]
    assert visits == sorted(visits, reverse=True) and visits[0] - visits[-1] <= 1 and visits[-1] >= 1
    assert skipped["empty_file"] >= visits[-1] and skipped["not_a_tar"] >= 1 and skipped["truncated_shard"] >= 1
    assert summary["seen_samples"] >= 200 and f"{sum(skipped.values())} skipped" in result.stdout
    assert summary["underfull_batches"] >= 1  # a batch left with one readable sample is not trained (BatchNorm)


def test_train_evaluates_on_a_broken_validation_set_and_counts_it(planted, tmp_path):
    """An epoch-end evaluation skips and counts bad validation images: hours of training never end in a crash."""
    config = train_config(tmp_path, planted.csv, val_retrieval=str(planted.jsonl))
    result = clipkd("train", str(config), "train.eval_every_epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["retrieval"]["skipped"] == JSONL_FAULTS and logged["retrieval"]["num_images"] == planted.jsonl_good


def test_train_stops_past_max_bad_fraction(planted, tmp_path):
    result = clipkd("train", str(train_config(tmp_path, planted.csv)), "--max-bad-fraction", "0.25")
    assert_stopped(result, "train")
    assert "6 of 16 samples were bad" in result.stderr and not (tmp_path / "run" / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------- cls
FOLDER_FAULTS = {"empty_file": 1, "bad_image": 2}


def plant_image_folder(root: Path, images: dict[str, list[bytes]]) -> Path:
    """ImageNet's layout (train/ and val/, a folder per class) with `images` per class in each split, plus the
    faults of FOLDER_FAULTS (an empty file, a truncated and a garbled image, made from the first image)."""
    first = next(iter(images.values()))[0]
    for split in ("train", "val"):
        for name, encoded in images.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index, data in enumerate(encoded):
                (root / split / name / f"{index}.{Image.open(io.BytesIO(data)).format.lower()}").write_bytes(data)
        classes = list(images)
        (root / split / classes[0] / "empty.png").write_bytes(b"")
        (root / split / classes[-1] / "truncated.png").write_bytes(truncated(first))
        (root / split / classes[-1] / "garbled.jpg").write_bytes(garbled_jpeg(first))
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of three good images and three bad ones per split."""
    png = _png((90, 30, 200))
    return plant_image_folder(tmp_path_factory.mktemp("image_folder"), {"cat": [png] * 3, "dog": [png] * 3})


def cls_config(tmp_path: Path, root: Path, **distill) -> Path:
    config = {"model": {"student": "resnet8"}, "data": {"dataset": "imagenet", "root": str(root), "workers": 0},
              "optim": {"lr": 0.01, "milestones": [5]},
              "train": {"epochs": 2, "batch_size": 3, "device": "cpu", "output_dir": str(tmp_path / "run"),
                        "log_every_steps": 1},
              "distill": {"method": "vanilla", **distill}}
    path = tmp_path / "cls.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_cls_train_and_centers_count_every_bad_image(image_folder, tmp_path):
    """A teacher trained alone, its class means, then a KD++ student: each counts the bad images per pass."""
    teacher = clipkd("cls", "train", str(cls_config(tmp_path / "teacher", image_folder)))
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    summary = json.loads((tmp_path / "teacher" / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == {k: 2 * v for k, v in FOLDER_FAULTS.items()}  # two epochs
    assert summary["seen_samples"] == 2 * 9 and "6 skipped (" in teacher.stdout
    student = cls_config(tmp_path / "student", image_folder, method="kd", dino_weight=1.0,
                         class_means=str(tmp_path / "centers"))
    weights = ["model.teacher=resnet8", f"model.teacher_pretrained={tmp_path / 'teacher/run/checkpoints/best.pt'}"]
    centers = clipkd("cls", "centers", str(student), *weights, f"centers.out={tmp_path / 'centers'}")
    assert centers.returncode == 0, centers.stderr[-2000:]
    written = json.loads((tmp_path / "centers" / "class_means.json").read_text())
    assert written["skipped"] == FOLDER_FAULTS and written["images"] == 6 and "3 skipped (" in centers.stdout
    trained = clipkd("cls", "train", str(student), *weights, "train.epochs=1")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((tmp_path / "student" / "run" / "summary.json").read_text())["skipped_samples"] == FOLDER_FAULTS


def test_cls_train_stops_past_max_bad_fraction(image_folder, tmp_path):
    result = clipkd("cls", "train", str(cls_config(tmp_path, image_folder)), "--max-bad-fraction", "0.2")
    assert_stopped(result, "cls")
    assert "3 of 9 samples were bad" in result.stderr


def test_cls_on_corrupted_toyworld_shards_counts_every_image_fault(planted, toyworld_dir, tmp_path):
    """`data.dataset=toyworld` reads the shards into memory: bad samples are dropped there, once, and counted."""
    import shutil

    root = tmp_path / "toyworld"
    shutil.copytree(toyworld_dir / "val", root / "val")
    shutil.copy(toyworld_dir / "toyworld.json", root / "toyworld.json")
    shutil.copytree(planted.shards, root / "train" / "shards")
    config = cls_config(tmp_path, root)
    result = clipkd("cls", "train", str(config), "data.dataset=toyworld", "train.epochs=1", "train.batch_size=8")
    assert result.returncode == 0, result.stderr[-2000:]
    image_faults = {k: v for k, v in SHARD_FAULTS.items() if k not in ("missing_caption", "invalid_utf8")}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == image_faults


def test_cls_image_folder_skips_and_counts_bad_images(image_folder):
    from torch.utils.data import DataLoader

    from clipkd_dino.classify.data import build_data, collate_classification

    data = build_data("imagenet", str(image_folder))
    for dataset in (data.train, data.train_plain, data.val):
        skipped, targets = Counter(), []
        for images, labels, bad in DataLoader(dataset, batch_size=4, collate_fn=collate_classification):
            assert images.shape[1:] == (3, 224, 224) or not len(labels)
            assert len(images) == len(labels)
            skipped.update(bad)
            targets += labels.tolist()
        assert skipped == FOLDER_FAULTS and sorted(targets) == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------- real photos
@pytest.fixture(scope="module")
def real_crops() -> dict[str, list[bytes]]:
    """JPEG crops of scikit-learn's two real photos (a temple in China, a flower), four of each."""
    import sklearn.datasets

    photos = Path(sklearn.datasets.__file__).parent / "images"
    crops: dict[str, list[bytes]] = {}
    for photo in ("china", "flower"):
        with Image.open(photos / f"{photo}.jpg") as image:
            for box in ((0, 0, 320, 240), (300, 150, 640, 427), (100, 50, 500, 400), (0, 200, 640, 427)):
                buffer = io.BytesIO()
                image.crop(box).resize((96, 72)).save(buffer, "JPEG")
                crops.setdefault(photo, []).append(buffer.getvalue())
    return crops


@pytest.fixture(scope="module")
def real_csv(real_crops, tmp_path_factory) -> tuple[Path, int]:
    """The crops captioned with real COCO captions, with the faults of CSV_FAULTS planted."""
    if not COCO_CAPTIONS.is_file():
        pytest.skip(f"shared COCO captions not available: {COCO_CAPTIONS}")
    annotations = json.loads(COCO_CAPTIONS.read_text())["annotations"]
    captions = [annotation["caption"].strip() for annotation in annotations[:8]]
    return plant_csv(tmp_path_factory.mktemp("real"), real_crops["china"] + real_crops["flower"], captions)


def test_real_photos_every_csv_command_counts_planted_faults(real_csv, planted, tmp_path):
    """concepts build, eval, label with a cache, and train distilling from that cache."""
    csv, good = real_csv
    result = clipkd("concepts", "build", str(csv), "--out", str(tmp_path / "pool.json"), "--min-count", "1",
                    "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "pool.json").read_text())["stats"]["skipped"] == CSV_CAPTION_FAULTS
    result = evaluate(tmp_path / "m.json", "--pairs", str(csv), "--skip-bad")
    assert result.returncode == 0, result.stderr[-2000:]
    retrieval = json.loads((tmp_path / "m.json").read_text())["retrieval"]
    assert retrieval["skipped"] == CSV_FAULTS and retrieval["num_images"] == good
    overrides = teacher_overrides(planted, csv, tmp_path, "cached")
    summary = json.loads((tmp_path / "labels" / "summary.json").read_text())
    assert summary["skipped"] == CSV_FAULTS and summary["samples"] == good
    result = clipkd("train", str(train_config(tmp_path, csv)), *overrides, "train.batch_size=2")  # 14 rows
    assert result.returncode == 0, result.stderr[-2000:]
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert trained["skipped_samples"] == CSV_FAULTS and trained["seen_samples"] == good + 6


def test_real_photos_cls_train_counts_planted_faults(real_crops, tmp_path):
    folder = plant_image_folder(tmp_path / "folder", {name: crops[:3] for name, crops in real_crops.items()})
    result = clipkd("cls", "train", str(cls_config(tmp_path, folder)), "train.epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == FOLDER_FAULTS and summary["seen_samples"] == 9


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, "PNG")
    return buffer.getvalue()
