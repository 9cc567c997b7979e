"""The pool file, merge, show, the `clipkd concepts` commands and the shipped COCO pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipkd_dino.cli import main
from clipkd_dino.concepts.lexicon import Lexicon
from clipkd_dino.concepts.pool import ConceptPool, format_table, merge_pools
from clipkd_dino.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED_POOL = REPO / "concepts" / "coco_val2017.json"
COCO_OBJECTS = ("fire hydrant", "stop sign", "teddy bear", "tennis racket", "hot dog", "traffic light")


def make_pool(counts: dict[str, int], **settings) -> ConceptPool:
    concepts = [{"concept": c, "count": n, "examples": [f"a {c}"]} for c, n in counts.items()]
    return ConceptPool(concepts, settings={"phrases": True, **settings}, spacy={"files_sha256": "x"},
                       sources=[{"path": "a.txt", "captions": 3}],
                       stats={"captions_used": 3, "skipped": {"empty": 1}, "vocabulary": len(counts)})


def test_save_load_round_trip_and_format_checks(tmp_path):
    pool = make_pool({"dog": 3, "cat": 1})
    pool.save(tmp_path / "p.json")
    loaded = ConceptPool.load(tmp_path / "p.json")
    assert loaded == pool and loaded.names() == ["dog", "cat"]
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["format"] == "clipkd-concept-pool" and data["version"] == 1
    data["version"] = 99
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="version 99 is not supported"):
        ConceptPool.load(tmp_path / "p.json")
    (tmp_path / "q.json").write_text("[]")
    with pytest.raises(UserError, match="not a concept pool"):
        ConceptPool.load(tmp_path / "q.json")


def test_merge_adds_counts_and_reranks():
    merged = merge_pools([make_pool({"dog": 3, "cat": 2}), make_pool({"cat": 5, "bird": 1})], None, 1)
    assert [(e["concept"], e["count"]) for e in merged.concepts] == [("cat", 7), ("dog", 3), ("bird", 1)]
    assert merged.stats["captions_used"] == 6 and merged.stats["skipped"] == {"empty": 2}
    assert len(merged.sources) == 2 and merged.concepts[0]["examples"] == ["a cat"]
    assert [e["concept"] for e in merge_pools([make_pool({"a": 1}), make_pool({"b": 2})], 1, 1).concepts] == ["b"]


def test_merge_refuses_different_settings():
    with pytest.raises(UserError, match="different settings: phrases"):
        merge_pools([make_pool({"dog": 1}), make_pool({"dog": 1}, phrases=False)], None, 1)


def test_show_prints_a_table():
    table = format_table(make_pool({"dog": 1234, "cat": 2}), rows=1)
    lines = table.splitlines()
    assert len(lines) == 3 and "rank" in lines[1] and "1,234  dog" in lines[2] and "cat" not in table


def test_cli_build_show_merge(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("A dog on a couch.\nTwo dogs and a cat.\n\n")
    out = tmp_path / "pool.json"
    assert main(["concepts", "build", str(corpus), "--out", str(out), "--min-count", "1", "--no-progress"]) == 0
    assert "skipped: empty 1" in capsys.readouterr().err
    assert main(["concepts", "show", str(out), "-n", "2"]) == 0
    assert "dog" in capsys.readouterr().out
    merged = tmp_path / "merged.json"
    assert main(["concepts", "merge", str(out), str(out), "--out", str(merged)]) == 0
    assert ConceptPool.load(merged).concepts[0] == {"concept": "dog", "count": 4,
                                                    "examples": ["A dog on a couch.", "Two dogs and a cat."]}


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["concepts", "build", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"caption source not found: {tmp_path / 'missing.txt'}")
    (tmp_path / "c.txt").write_text("a dog\n")
    args = ["concepts", "build", str(tmp_path / "c.txt"), "--out", str(tmp_path / "p.json"), "--spacy-model", "nope"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "spaCy model nope is not installed" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["build", "show", "merge"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["concepts", command, "--help"])
    assert exit_.value.code == 0 and "usage: clipkd concepts " + command in capsys.readouterr().out


def test_shipped_coco_pool_holds_coco_objects_and_no_stop_words():
    pool = ConceptPool.load(SHIPPED_POOL)
    names = pool.names()
    assert pool.settings["phrases"] is True and pool.sources[0]["path"].endswith("captions_val2017.json")
    assert all(name in names[:300] for name in COCO_OBJECTS), [n for n in COCO_OBJECTS if n not in names[:300]]
    stop = Lexicon.load().stop
    assert not [name for name in names[:100] if name in stop]
    counts = [entry["count"] for entry in pool.concepts]
    assert counts == sorted(counts, reverse=True) and all(entry["examples"] for entry in pool.concepts[:100])


def test_shipped_prompt_templates():
    data = json.loads((REPO / "concepts" / "prompts.json").read_text())
    assert data["templates"] and all(t.count("{}") == 1 for t in data["templates"])
