"""LAION's CLIP_benchmark (the real one, 1.6.2) on a student exported by `clipkd export`: the same numbers as
`clipkd eval` on the same images, captions, classes and prompts, and `clipkd eval --clip-benchmark` writes its result
layout. Retrieval runs through its command line; zero-shot classification through its own classifier and logits
(`zero_shot_classifier`, `run_classification`), because its command line's `accuracy` fails under NumPy 2 (it calls
float() on a 1-element array: "only 0-dimensional arrays can be converted to Python scalars")."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipkd_dino.models import create_model
from clipkd_dino.export.open_clip_folder import export_model
from conftest import clipkd

CLIP_BENCHMARK = Path(sys.executable).parent / "clip_benchmark"


def _as_coco_captions(val: Path, root: Path) -> Path:
    """toyworld's val retrieval set as CLIP_benchmark's `mscoco_captions` (ROOT/val2014 + a COCO caption file)."""
    images_dir = root / "mscoco_captions" / "val2014"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for index, line in enumerate((val / "retrieval.jsonl").read_text().splitlines()):
        entry = json.loads(line)
        shutil.copy(val / entry["image"], images_dir / Path(entry["image"]).name)
        images.append({"id": index, "file_name": Path(entry["image"]).name})
        annotations += [{"id": len(annotations) + number, "image_id": index, "caption": caption}
                        for number, caption in enumerate(entry["captions"])]
    annotation_file = root / "captions_val.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    return annotation_file


def _as_image_folder(zeroshot: Path, folder: Path) -> list[str]:
    """toyworld's zero-shot set as an image folder (a sub-folder per class, sorted = class order); returns the
    names of the classes it holds, in that order."""
    names = json.loads((zeroshot / "classnames.json").read_text())
    present = set()
    for line in (zeroshot / "samples.csv").read_text().splitlines()[1:]:
        path, label = line.split("\t")
        target = folder / f"{int(label):02d}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(zeroshot / path, target / Path(path).name)
        present.add(int(label))
    return [names[label] for label in sorted(present)]


def _their_classification(student: Path, folder: Path, classnames: list[str], templates: list[str]) -> dict:
    """acc1, acc5 and mean_per_class_recall (as its `evaluate` defines them) from CLIP_benchmark's own zero-shot
    classifier and logits, the model, tokenizer and preprocessing from plain open_clip."""
    import open_clip
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from sklearn.metrics import balanced_accuracy_score
    from torchvision.datasets import ImageFolder

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{student}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{student}")
    classifier = zero_shot_classifier(model.eval(), tokenizer, classnames, templates, "cpu", amp=False)
    loader = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=preprocess), batch_size=8)
    logits, target = run_classification(model, classifier, loader, "cpu", amp=False)
    top5 = logits.topk(5, dim=1).indices
    return {"acc1": (logits.argmax(dim=1) == target).float().mean().item(),
            "acc5": (top5 == target[:, None]).any(dim=1).float().mean().item(),
            "mean_per_class_recall": balanced_accuracy_score(target.numpy(), logits.argmax(dim=1).numpy())}


@pytest.mark.slow
def test_clip_benchmark_scores_an_exported_student_as_clipkd_eval_does(tmp_path, toyworld_dir):
    torch.manual_seed(0)  # untrained: the toy teacher finds every one of these 24 images, this student some
    student = export_model(create_model("toy-student"), "toy-student", tmp_path / "student")
    val, root = toyworld_dir / "val", tmp_path / "datasets"
    annotation_file = _as_coco_captions(val, root)
    classnames = _as_image_folder(val / "zeroshot", root / "imagenet_sketch")
    (tmp_path / "names.json").write_text(json.dumps(classnames))
    templates = val / "zeroshot" / "templates.json"
    theirs_templates = [template.replace("{}", "{c}") for template in json.loads(templates.read_text())]

    theirs = subprocess.run(
        [str(CLIP_BENCHMARK), "eval", "--dataset", "mscoco_captions", "--dataset_root", str(root / "mscoco_captions"),
         "--annotation_file", str(annotation_file), "--split", "test", "--model", f"local-dir:{student}",
         "--pretrained", "none", "--recall_k", "1", "5", "10", "--no_amp", "--batch_size", "8", "--num_workers", "0",
         "--output", str(tmp_path / "theirs_zeroshot_retrieval.json")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    theirs_classification = _their_classification(student, root / "imagenet_sketch", classnames, theirs_templates)

    ours = clipkd("eval", "--model", f"local-dir:{student}", "--retrieval", str(val / "retrieval.jsonl"),
                  "--zeroshot", str(root / "imagenet_sketch"), "--classnames", str(tmp_path / "names.json"),
                  "--templates", str(templates), "--out", str(tmp_path / "ours.json"),
                  "--clip-benchmark", str(tmp_path / "ours"), "--no-cache", "--workers", "0")
    assert ours.returncode == 0, ours.stderr[-3000:]
    written = {json.loads(path.read_text())["task"]: json.loads(path.read_text())
               for path in (tmp_path / "ours").glob("*.json")}
    assert sorted(path.name for path in (tmp_path / "ours").glob("*.json")) == [  # CLIP_benchmark's naming
        "imagenet_sketch_none_student_en_zeroshot_classification.json",
        "retrieval_none_student_en_zeroshot_retrieval.json"]
    reference = json.loads((tmp_path / "theirs_zeroshot_retrieval.json").read_text())
    assert set(written["zeroshot_retrieval"]) == set(reference)  # the same layout
    assert written["zeroshot_retrieval"]["metrics"] == pytest.approx(reference["metrics"], abs=1e-6)
    assert written["zeroshot_classification"]["metrics"] == pytest.approx(theirs_classification, abs=1e-6)
    retrieval = written["zeroshot_retrieval"]["metrics"]
    assert 0 < retrieval["text_retrieval_recall@1"] < retrieval["text_retrieval_recall@10"] <= 1
    assert written["zeroshot_retrieval"]["dataset"] == "retrieval"
    assert written["zeroshot_classification"]["dataset"] == "imagenet_sketch"
