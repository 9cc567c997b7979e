"""Every command answers a bad argument or config with one line naming the key or path, exit code 2, before any
heavy work: per command, a missing file, a bad value, and (for config files) an unknown key and a wrong type."""

from __future__ import annotations

import time

import pytest

from clipkd_dino.cli import main
from conftest import REPO

CONFIG = str(REPO / "configs" / "toy_student.yaml")
CLS = str(REPO / "configs" / "cls" / "digits" / "student.yaml")
CASES = [
    # (argv, what the one line must name)
    (["toyworld", "--out", "{tmp}/tw", "--train", "-3"], "--train"),
    (["toyworld", "--out", "/proc/no/such/dir", "--train", "4", "--val", "0"], "/proc/no/such/dir"),
    (["concepts", "build", "/no/such/captions.txt", "--out", "{tmp}/pool.json"], "/no/such/captions.txt"),
    (["concepts", "show", "/no/such/pool.json"], "/no/such/pool.json"),
    (["concepts", "merge", "/no/such/a.json", "/no/such/b.json", "--out", "{tmp}/ab.json"], "/no/such/a.json"),
    (["label", "--teacher", "toy-teacher", "--teacher-pretrained", "/no/such/teacher.pt", "--concepts",
      str(REPO / "concepts" / "coco_val2017.json"), "--data", "/no/such/shards", "--out", "{tmp}/labels"],
     "/no/such/"),
    (["label", "stats", "/no/such/labels"], "/no/such/labels"),
    (["train", "/no/such/config.yaml"], "/no/such/config.yaml"),
    (["train", CONFIG, "train.epochz=3"], "train.epochz"),
    (["train", CONFIG, "train.epochs=three"], "train.epochs"),
    (["train", CONFIG, "train.epochs=0"], "train.epochs"),
    (["train", CONFIG, "data.train=/no/such/train.csv"], "/no/such/train.csv"),
    (["train", CONFIG, "--max-bad-fraction", "1.5"], "data.max_bad_fraction"),
    (["eval", "--model", "toy-student", "--pretrained", "/no/such/model.pt", "--retrieval", "/no/such/r.jsonl",
      "--out", "{tmp}/m.json"], "/no/such/"),
    (["eval", "compare", "/no/such/a.json", "/no/such/b.json"], "/no/such/a.json"),
    (["export", "/no/such/checkpoint.pt", "--out", "{tmp}/exported"], "/no/such/checkpoint.pt"),
    (["cls", "centers", CLS, "model.teacher_pretrained=/no/such/teacher.pth"], "model.teacher_pretrained"),
    (["cls", "train", CLS, "distill.kd_wieght=2"], "distill.kd_wieght"),
    (["cls", "train", CLS, "train.batch_size=big"], "train.batch_size"),
    (["cls", "train", CLS, "data.max_bad_fraction=2"], "data.max_bad_fraction"),
    (["cls", "centers", CLS, "--max-bad-fraction", "-0.1"], "data.max_bad_fraction"),
    (["cls", "train", CLS, "data.dataset=imagenet", "data.root=/no/such/imagenet"], "data.root"),
    (["demo", "--seeds", "0"], "--seeds"),
]


@pytest.mark.parametrize("argv, named", CASES, ids=lambda case: " ".join(case)[:60] if isinstance(case, list) else "")
def test_one_line_exit_2_naming_the_mistake(tmp_path, capsys, argv, named):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    start = time.time()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"clipkd {argv[0]}: error:") and named in err, err
    assert time.time() - start < 30, "mistakes are caught before heavy work"
