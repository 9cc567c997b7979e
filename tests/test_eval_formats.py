"""Evaluation on the public formats: Karpathy files, CSV / webdataset pairs, image folders, the embedding cache,
--skip-bad, torch vs faiss search, open_clip's zero-shot classifier, `clipkd eval compare`, and real photos."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import ToTensor

from clipkd_dino import cli
from clipkd_dino.errors import UserError
from clipkd_dino.eval import encode as encode_module
from clipkd_dino.eval.encode import encode_image_set
from clipkd_dino.eval.evaluate import evaluate_model
from clipkd_dino.eval.retrieval import retrieval_metrics
from clipkd_dino.eval.search import faiss_available, top_k
from clipkd_dino.eval.sources import check_images, read_karpathy, read_pairs
from clipkd_dino.eval.zeroshot import read_image_folder, read_zeroshot, zeroshot_classifier
from clipkd_dino.models import create_model, get_tokenizer, load_clip
from test_eval import tiny_checkpoint  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]
COCO_CAPTIONS = REPO.parent / "shared" / "data" / "coco" / "captions_val2017.json"
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


def _image(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, (7 * value) % 256)).save(path)


def _karpathy(path: Path, images: list[dict]) -> Path:
    path.write_text(json.dumps({"dataset": "test", "images": images}))
    return path


def _entry(filename: str, split: str, captions: list[str], filepath: str | None = None) -> dict:
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    return entry | ({"filepath": filepath} if filepath is not None else {})


def test_karpathy_with_and_without_filepath(tmp_path):
    path = _karpathy(tmp_path / "dataset.json", [
        _entry("a.jpg", "test", ["one", "two"], filepath="val2014"),
        _entry("b.jpg", "train", ["three"], filepath="train2014"),
        _entry("c.jpg", "test", ["four", "five", "six"]),
    ])
    data = read_karpathy(path, tmp_path / "root")
    assert data.images == [tmp_path / "root" / "val2014" / "a.jpg", tmp_path / "root" / "c.jpg"]
    assert data.image_ids == ["val2014/a.jpg", "c.jpg"] and data.format == "karpathy"
    assert data.captions == ["one", "two", "four", "five", "six"] and data.text_to_image == [0, 0, 1, 1, 1]
    assert read_karpathy(path, tmp_path, split="train").captions == ["three"]
    with pytest.raises(UserError, match=r"no image in split 'val' \(splits: test, train\)"):
        read_karpathy(path, tmp_path, split="val")
    with pytest.raises(UserError, match="image file not found: .*a.jpg \\(2 missing"):
        check_images(data)
    dropped = check_images(data, skip_bad=True)
    assert dropped.images == [] and dropped.skipped == ("val2014/a.jpg", "c.jpg") and dropped.skipped_captions == 5


@pytest.mark.parametrize(("content", "message"), [
    ("{", r"dataset.json:1: invalid JSON"),
    ('{"images": [{"split": "test"}]}', r"images\[0\]: expected an object with 'filename' and 'split'"),
    ('{"images": [{"filename": "a", "split": "test", "sentences": [{"tokens": []}]}]}', r"needs a 'raw' string"),
    ('{"images": [{"filename": "a", "split": "test", "sentences": []}]}', r"images\[0\]: no sentences"),
])
def test_karpathy_errors_name_the_file(tmp_path, content, message):
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(UserError, match=message):
        read_karpathy(tmp_path / "dataset.json", tmp_path)


def _png(value: int) -> bytes:
    stream = io.BytesIO()
    Image.new("RGB", (20, 20), (value, value, 0)).save(stream, format="PNG")
    return stream.getvalue()


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


class _Flatten(torch.nn.Module):
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)


def test_pairs_from_csv_and_webdataset(tmp_path):
    for index in range(3):
        _image(tmp_path / "img" / f"{index}.png", 40 * index)
    rows = ["filepath\ttitle", "img/0.png\ta dog", "img/1.png\ta cat", "img/0.png\ta puppy", "img/2.png\ta bird"]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    csv_set = read_pairs(str(tmp_path / "val.csv"))
    assert csv_set.format == "csv" and csv_set.image_ids == ["img/0.png", "img/1.png", "img/2.png"]
    assert csv_set.captions == ["a dog", "a puppy", "a cat", "a bird"] and csv_set.text_to_image == [0, 0, 1, 2]
    with tarfile.open(tmp_path / "shard-0.tar", "w") as archive:
        for index in range(2):
            _tar_member(archive, f"s{index}.png", _png(50 * index))
            _tar_member(archive, f"s{index}.txt", f"caption {index}\nother {index}\n".encode())
    shards = read_pairs(str(tmp_path / "shard-0.tar"))
    assert shards.format == "webdataset" and shards.image_ids == ["s0", "s1"] and shards.text_to_image == [0, 0, 1, 1]
    pixels, bad = encode_image_set(_Flatten(), shards.images, ToTensor(), torch.device("cpu"), batch_size=1)
    assert bad == [] and pixels[:, 0].tolist() == [0.0, pytest.approx(50 / 255)]
    with tarfile.open(tmp_path / "shard-1.tar", "w") as archive:
        _tar_member(archive, "lonely.png", _png(1))
    with pytest.raises(UserError, match="sample 'lonely' has no caption"):
        read_pairs(str(tmp_path / "shard-1.tar"))


def test_image_folder_classes_and_imagenet_wnids(tmp_path):
    for name in ("golden_retriever", "tabby_cat"):
        _image(tmp_path / "pets" / name / "x.jpg", 10)
        _image(tmp_path / "pets" / name / "sub" / "y.JPEG", 20)
    pets = read_image_folder(tmp_path / "pets")
    assert pets.classnames == ["golden retriever", "tabby cat"] and pets.labels == [0, 0, 1, 1]
    assert pets.image_ids[1] == "golden_retriever/x.jpg" and len(pets.templates) == 80 and "{}" in pets.templates[0]
    (tmp_path / "names.txt").write_text("dog\ncat\n")
    (tmp_path / "templates.json").write_text(json.dumps(["a {}."]))
    custom = read_zeroshot(tmp_path / "pets", tmp_path / "names.txt", tmp_path / "templates.json")
    assert custom.classnames == ["dog", "cat"] and custom.templates == ["a {}."]
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(UserError, match="3 class names for 2 classes"):
        read_zeroshot(tmp_path / "pets", tmp_path / "three.txt")
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = [f"n{index:08d}" for index in range(1000)]
    for wnid in wnids[::-1]:
        (tmp_path / "imagenet" / wnid).mkdir(parents=True)
    _image(tmp_path / "imagenet" / wnids[2] / "ILSVRC2012_val_00000001.JPEG", 5)
    imagenet = read_image_folder(tmp_path / "imagenet")
    assert imagenet.classnames == list(IMAGENET_CLASSNAMES) and imagenet.labels == [2]
    (tmp_path / "imagenet" / wnids[0]).rmdir()
    with pytest.raises(UserError, match="999 ImageNet WNID folders"):
        read_image_folder(tmp_path / "imagenet")


def test_torch_and_faiss_searches_agree_on_hand_cases_and_random_data():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(53, 16, generator=generator), torch.randn(170, 16, generator=generator)
    owner = torch.cat([torch.arange(53), torch.randint(0, 53, (117,), generator=generator)])
    configs = [{"chunk_size": 7, "gallery_chunk": 11}, {"chunk_size": 1000, "gallery_chunk": 5}, {}]
    backends = ["torch", "faiss"] if faiss_available() else ["torch"]
    results = [retrieval_metrics(images, texts, owner, ks=(1, 3, 10), backend=b, **c)
               for b in backends for c in configs]
    assert all(result == results[0] for result in results)
    tied = [retrieval_metrics(torch.ones(3, 4), torch.ones(6, 4), [0, 0, 1, 1, 2, 2], ks=(1, 4, 5), backend=b,
                              chunk_size=2, gallery_chunk=2) for b in backends]
    assert all(t == {"i2t_R@1": 0, "i2t_R@4": 0, "i2t_R@5": 100, "t2i_R@1": 0, "t2i_R@4": 100, "t2i_R@5": 100}
               for t in tied)


@needs_faiss
def test_top_k_torch_equals_faiss():
    queries, gallery = torch.randn(40, 8), torch.randn(300, 8)
    torch_scores, torch_ids = top_k(queries, gallery, 12, "torch", query_chunk=9, gallery_chunk=17)
    faiss_scores, faiss_ids = top_k(queries, gallery, 12, "faiss", query_chunk=9)
    assert torch.equal(torch_ids, faiss_ids)
    torch.testing.assert_close(torch_scores, faiss_scores)


def test_zeroshot_classifier_equals_open_clip(tiny_checkpoint):
    from open_clip import build_zero_shot_classifier

    model = create_model(*tiny_checkpoint)
    tokenizer = get_tokenizer(tiny_checkpoint[0])
    names, templates = ["cat", "dog", "tabby cat"], ["a photo of a {}.", "a {} in the wild", "{}"]
    ours = zeroshot_classifier(model, tokenizer, names, templates, torch.device("cpu"), batch_size=4)
    theirs = build_zero_shot_classifier(model, tokenizer, names, templates, num_classes_per_batch=2)
    torch.testing.assert_close(ours, theirs)


class _Spy:
    def __init__(self, monkeypatch) -> None:
        self.calls = {"images": 0, "texts": 0}
        for name, kind in (("encode_image_set", "images"), ("encode_texts", "texts")):
            original = getattr(encode_module, name)
            monkeypatch.setattr(f"clipkd_dino.eval.evaluate.{name}", self._counting(original, kind))

    def _counting(self, function, kind):
        def wrapper(*args, **kwargs):
            self.calls[kind] += 1
            return function(*args, **kwargs)
        return wrapper


def test_embedding_cache_reuses_and_invalidates(tmp_path, tiny_checkpoint, monkeypatch):
    for index in range(4):
        _image(tmp_path / "img" / f"{index}.png", 60 * index)
    entries = [_entry(f"{i}.png", "test", [f"cap {i}", f"alt {i}"], "img") for i in range(4)]
    path = _karpathy(tmp_path / "k.json", entries)
    spy = _Spy(monkeypatch)
    name = tiny_checkpoint[0]
    loaded = load_clip(*tiny_checkpoint)
    model, transform, tokenizer = loaded.model, loaded.transform, loaded.tokenizer

    def evaluate(data_file=path, model=model):
        data = read_karpathy(data_file, tmp_path)
        return evaluate_model(model, tokenizer, transform, retrieval=data, cache=tmp_path / "cache", model_name=name)

    first = evaluate()
    assert spy.calls == {"images": 1, "texts": 1}
    assert evaluate() == first and spy.calls == {"images": 1, "texts": 1}, "a second eval must not re-encode"
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    with torch.no_grad():
        changed = create_model(*tiny_checkpoint)
        changed.logit_scale.add_(1.0)
    evaluate(model=changed)
    assert spy.calls == {"images": 2, "texts": 2}, "new weights, new embeddings"
    _image(tmp_path / "img" / "3.png", 99, size=(41, 30))
    evaluate()
    assert spy.calls == {"images": 3, "texts": 2}, "a changed image file re-encodes the images only"
    other = _karpathy(tmp_path / "k2.json", [_entry(f"{i}.png", "test", [f"new {i}"], "img") for i in range(4)])
    evaluate(other)
    assert spy.calls == {"images": 3, "texts": 3}, "new captions re-encode the texts only"


def test_skip_bad_drops_unreadable_and_missing_images(tmp_path, tiny_checkpoint, capsys):
    for index in range(3):
        _image(tmp_path / "img" / f"{index}.png", 60 * index)
    (tmp_path / "img" / "1.png").write_bytes(b"not an image")
    entries = [_entry(f"{i}.png", "test", [f"cap {i}"] * (i + 1), "img") for i in range(4)]  # 3.png is missing
    path = _karpathy(tmp_path / "k.json", entries)
    base = ["eval", "--pretrained", tiny_checkpoint[1], "--karpathy", str(path), "--images", str(tmp_path),
            "--workers", "0",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "m.json")]
    assert cli.main(base) == 2
    assert "3.png (1 missing; --skip-bad drops them" in capsys.readouterr().err
    (tmp_path / "img" / "3.png").write_bytes(_png(3))
    assert cli.main(base) == 2
    error = capsys.readouterr().err
    assert "cannot read image" in error and "1.png" in error and error.count("\n") == 1
    (tmp_path / "img" / "3.png").unlink()
    assert cli.main([*base, "--skip-bad", "--search", "torch"]) == 0
    retrieval = json.loads((tmp_path / "m.json").read_text())["retrieval"]
    assert (retrieval["num_images"], retrieval["num_captions"]) == (2, 4)
    assert retrieval["skipped_images"] == 2 and retrieval["skipped_captions"] == 6
    assert retrieval["skipped_files"] == ["img/3.png", "img/1.png"]


def test_eval_all_formats_and_compare(tmp_path, tiny_checkpoint, capsys):
    for index in range(3):
        _image(tmp_path / "pets" / ("cat" if index % 2 else "dog") / f"{index}.png", 70 * index)
    rows = ["filepath\ttitle"] + [f"pets/{'cat' if i % 2 else 'dog'}/{i}.png\tpet {i}" for i in range(3)]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    common = ["--workers", "0", "--device", "cpu", "--no-cache"]
    argv = ["eval", "--pretrained", tiny_checkpoint[1], "--pairs", str(tmp_path / "val.csv"),
            "--zeroshot", str(tmp_path / "pets"),
            "--out", str(tmp_path / "a.json"), *common]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["model"] == tiny_checkpoint[0] and report["retrieval"]["format"] == "csv"
    assert report["zeroshot"]["num_classes"] == 2 and report["zeroshot"]["num_templates"] == 80
    assert len(report["retrieval"]["digest"]) == 64 and (tmp_path / "a.md").read_text().startswith("| metric")
    assert cli.main([*argv[:-len(common) - 2], "--out", str(tmp_path / "b.json"), "--search", "torch", *common]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                     "--out", str(tmp_path / "ab.md")]) == 0
    table = capsys.readouterr().out
    assert "any_caption i2t R@1" in table and "zero-shot top1" in table and "warning" not in table
    assert table.splitlines()[0] == f"| metric (%) | {tmp_path / 'a.json'} | {tmp_path / 'b.json'} |"
    assert cli.main(["eval", "compare", str(tmp_path / "missing.json")]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not COCO_CAPTIONS.is_file(), reason="shared COCO captions not available")
def test_karpathy_eval_equals_plain_open_clip_on_real_photos(tmp_path):
    """Crops of scikit-learn's two sample photos, captioned with COCO captions; the check script uses open_clip only."""
    import sklearn.datasets

    photos = Path(sklearn.datasets.__file__).parent / "images"
    coco = json.loads(COCO_CAPTIONS.read_text())
    by_image: dict[int, list[str]] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    captions = [by_image[key] for key in sorted(by_image)[:8]]
    entries = []
    for index, (photo, box) in enumerate((p, b) for p in ("china.jpg", "flower.jpg")
                                         for b in ((0, 0, 320, 240), (300, 150, 640, 427), (100, 50, 500, 400),
                                                   (0, 200, 640, 427))):
        folder = "crops" if index % 2 else ""  # with and without a Karpathy filepath
        (tmp_path / folder).mkdir(exist_ok=True)
        with Image.open(photos / photo) as image:
            image.crop(box).save(tmp_path / folder / f"{index}.jpg")
        entries.append(_entry(f"{index}.jpg", "test", captions[index], folder or None))
    karpathy = _karpathy(tmp_path / "dataset_real.json", entries)
    checkpoint = tmp_path / "student.pt"
    torch.manual_seed(1)
    torch.save({"state_dict": create_model("toy-student").state_dict(), "model_name": "toy-student"}, checkpoint)
    report = tmp_path / "ours.json"
    assert cli.main(["eval", "--pretrained", str(checkpoint), "--karpathy", str(karpathy), "--images", str(tmp_path),
                     "--out", str(report), "--workers", "0", "--device", "cpu", "--no-cache"]) == 0
    assert cli.main(["export", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    check = subprocess.run([sys.executable, str(REPO / "benchmarks" / "check_karpathy.py"), str(karpathy),
                            "--images", str(tmp_path), "--model", f"local-dir:{tmp_path / 'exported'}",
                            "--compare", str(report)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "agree" in check.stdout
    ours = json.loads(report.read_text())["retrieval"]
    assert (ours["num_images"], ours["num_captions"]) == (8, sum(len(c) for c in captions))
    assert 0 < ours["any_caption"]["t2i_R@5"] < 100  # a random model on 8 images: neither trivial extreme
