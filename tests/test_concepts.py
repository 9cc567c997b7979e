"""Concept extraction and pool building with spaCy on small hand-made corpora (spaCy loaded once per module)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipkd_dino.concepts.build import BuildOptions, Tally, build_pool
from clipkd_dino.concepts.lexicon import Lexicon
from clipkd_dino.concepts.parser import Analyzer, Extractor, load_nlp, make_tok, resolve_model
from clipkd_dino.concepts.pool import Collocation
from clipkd_dino.errors import UserError

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco" / "captions_val2017.json"


@pytest.fixture(scope="module")
def model() -> str:
    return resolve_model(None)


@pytest.fixture(scope="module")
def nlp(model):
    return load_nlp(model, "fast", True)  # cached: the builds below reuse it


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


def concepts(nlp, lexicon, text: str, phrases: bool = True) -> list[str]:
    """The concept mentions of one caption, sorted; the caption alone says which of its words are verbs."""
    extract = Extractor(lexicon, phrases, 3)
    tally = Tally()
    tally.add(*Analyzer(nlp, extract, 64).parse([text]), text)
    tally.resolve(extract)
    return sorted(tally.counts.elements())


def test_plural_nouns_are_lemmatised(nlp, lexicon):
    assert concepts(nlp, lexicon, "Two dogs chase three cats past the benches.", phrases=False) == [
        "bench", "cat", "dog"]


def test_noun_compounds_with_phrases(nlp, lexicon):
    text = "A red fire hydrant on a sidewalk near a stop sign."
    assert concepts(nlp, lexicon, text) == ["fire hydrant", "sidewalk", "stop sign"]
    assert concepts(nlp, lexicon, text, phrases=False) == ["fire", "hydrant", "sidewalk", "sign", "stop"]
    text = "Two teddy bears sit under a traffic light."  # "teddy" tagged NNP: lowercase, so a common noun
    assert concepts(nlp, lexicon, text) == ["teddy bear", "traffic light"]
    assert concepts(nlp, lexicon, text, phrases=False) == ["bear", "light", "teddy", "traffic"]
    assert concepts(nlp, lexicon, "Two Nintendo Wii remotes.") == ["nintendo wii remote"]
    assert concepts(nlp, lexicon, "A fire hydrant next to a stop sign.") == ["fire hydrant", "stop sign"]


def test_stop_list_removes_non_objects_and_trims_compound_heads(nlp, lexicon):
    assert concepts(nlp, lexicon, "A picture of a dog in front of a building.") == ["building", "dog"]
    assert concepts(nlp, lexicon, "A kitchen area with a stove.") == ["kitchen", "stove"]
    assert concepts(nlp, lexicon, "A couple of cars in a parking lot.") == ["car", "parking lot"]


def test_colour_words_before_a_noun_are_adjectives(nlp, lexicon):
    # the tagger reads "orange" and "white" here as (proper) nouns: "orange house" would be a compound
    assert concepts(nlp, lexicon, "a purple cross and an orange house") == ["cross", "house"]
    assert concepts(nlp, lexicon, "white cross on a noisy dark gray background") == ["cross"]
    assert concepts(nlp, lexicon, "an orange house", phrases=False) == ["house"]
    assert concepts(nlp, lexicon, "an orange on a plate") == ["orange", "plate"]


def test_depiction_and_position_words_are_stopped(nlp, lexicon):
    assert concepts(nlp, lexicon, "a sketch of a dog") == ["dog"]
    assert concepts(nlp, lexicon, "a drawing of a red house in the top right corner") == ["house"]
    assert concepts(nlp, lexicon, "A kitchen in the midst of the process of being remodeled.") == ["kitchen"]


def test_aliases_merge_spelling_variants(nlp, lexicon):
    assert concepts(nlp, lexicon, "A boy on a skate board holds a tennis racquet.") == [
        "boy", "skateboard", "tennis racket"]


def test_auxiliary_forms_are_never_nouns():
    assert make_tok("being", "NOUN", "being", True).kind == ""
    assert make_tok("suitcase", "NOUN", "suitcase", True).kind == "N"
    assert make_tok("dog2", "NOUN", "dog2", False).kind == ""


def test_fast_path_equals_the_full_pipeline(model, nlp, lexicon):
    captions = [
        "A man riding a wave on top of a surfboard.", "Two hot dogs with mustard on a paper plate.",
        "Duffel bag, plastic travel bag, and suitcase sit on carpet in front of drapes.",
        "A teddy bear sitting on a bed next to a Wii remote.", "The giraffes are being fed by the zoo keepers.",
    ]
    if COCO.is_file():
        captions += [a["caption"] for a in json.loads(COCO.read_text())["annotations"][:300]]
    extract = Extractor(lexicon, True, 3)
    fast = Analyzer(nlp, extract, 64).parse(captions)
    assert Analyzer(load_nlp(model, "full", False), extract, 256).parse(captions) == fast


def write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def options(**overrides) -> BuildOptions:
    defaults = {"phrases": True, "min_count": 1, "top_k": None, "progress": False, "batch_size": 64}
    return BuildOptions(**{**defaults, **overrides})


def counts(pool) -> dict[str, int]:
    return {entry["concept"]: entry["count"] for entry in pool.concepts}


def test_build_counts_ranks_and_cuts(tmp_path):
    corpus = write(tmp_path / "c.txt", ["A dog and a dog on a couch."] * 3 + ["A cat on a couch."] * 2 + ["A bird."])
    pool = build_pool([corpus], options())
    assert pool.concepts[0] == {"concept": "dog", "count": 6, "examples": ["A dog and a dog on a couch."]}
    assert counts(pool) == {"dog": 6, "couch": 5, "cat": 2, "bird": 1}
    assert pool.run["distinct_parsed"] == 3 and pool.stats["captions_used"] == 6
    assert counts(build_pool([corpus], options(min_count=2, top_k=2))) == {"dog": 6, "couch": 5}
    assert pool.sources[0]["sha256"] and pool.spacy["version"] and pool.spacy["files_sha256"]
    no_cache = build_pool([corpus], options(cache_size=0))
    assert counts(no_cache) == counts(pool) and no_cache.run["distinct_parsed"] == 6


def test_adjective_noun_collocation_from_corpus_statistics(tmp_path):
    lines = [f"A hot dog with {t} on a plate." for t in ("mustard", "ketchup", "onions", "relish")] * 3
    lines += ["A brown dog runs on the grass.", "A small dog sleeps on a bed.", "A hot day at the beach."]
    pool = build_pool([write(tmp_path / "c.txt", lines)], options(collocation=Collocation(min_count=10)))
    found = counts(pool)
    assert found["hot dog"] == 12 and found["dog"] == 2
    assert [c["phrase"] for c in pool.collocations] == ["hot dog"]
    examples = {entry["concept"]: entry["examples"] for entry in pool.concepts}
    assert all("hot dog" in e for e in examples["hot dog"]) and not any("hot" in e for e in examples["dog"])
    strict = build_pool([write(tmp_path / "c.txt", lines)], options(collocation=Collocation(min_count=13)))
    assert "hot dog" not in counts(strict) and counts(strict)["dog"] == 14


def test_verbs_read_as_nouns_do_not_enter_compounds(tmp_path):
    lines = [
        "A zebra grazing in a field.", "A zebra grazes near a tree.",  # tagged as nouns here...
        "Two zebras are grazing.", "a zebra is grazing by a tree", "Zebras graze on the grass.",  # ...verbs here
        "People on a tennis court playing tennis.", "A woman is playing tennis.", "A woman is playing tennis.",
        "An office building next to a brick building.", "A man cutting bread on a cutting board.",
    ]
    found = counts(build_pool([write(tmp_path / "c.txt", lines)], options()))
    assert not [concept for concept in found if "graz" in concept or "playing" in concept]
    assert found["zebra"] == 5 and found["tennis court"] == 1 and found["tennis"] == 3
    assert found["office building"] == found["brick building"] == found["cutting board"] == 1


def test_toyworld_pool_is_its_sixteen_kinds(tmp_path):
    from clipkd_dino.toyworld.generate import generate
    from clipkd_dino.toyworld.captions import KINDS

    generate(tmp_path, n_train=600, n_val=0, image_size=48, seed=0, workers=1, shard_size=200)
    pool = build_pool([str(tmp_path / "train" / "shards")], options(top_k=16))
    assert set(pool.names()) == set(KINDS) and pool.stats["captions_used"] == 3000


def test_every_source_format_in_one_build(tmp_path):
    from test_concepts_sources import write_shard

    write(tmp_path / "a.txt", ["A dog on a couch."])
    (tmp_path / "b.tsv").write_text("filepath\ttitle\nx.jpg\tA cat on a couch.\n")
    (tmp_path / "c.json").write_text(json.dumps({"annotations": [{"caption": "A dog on a bench."}]}))
    (tmp_path / "d.jsonl").write_text(json.dumps({"caption": "A bird on a bench."}) + "\n")
    write_shard(tmp_path / "e-0.tar", ["A cat on a bench."])
    write_shard(tmp_path / "e-1.tar", ["A dog in a car."])
    names = ["a.txt", "b.tsv", "c.json", "d.jsonl", "e-{0..1}.tar"]
    pool = build_pool([str(tmp_path / name) for name in names], options())
    assert counts(pool) == {"bench": 3, "dog": 3, "cat": 2, "couch": 2, "bird": 1, "car": 1}
    assert [s["format"] for s in pool.sources] == ["text", "csv", "coco", "jsonl", "webdataset", "webdataset"]


def test_bad_input_is_counted_never_fatal(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\n".join([
        b"", b"   ", b"A dog \xff\xfe on a couch.", b"Fish &amp; chips on a plate.", b"A cat " + b"and a cat " * 80,
        "Un chien noir sur la plage avec une balle.".encode(), "一只狗在沙滩上奔跑".encode(), b"A bird.",
    ]))
    pool = build_pool([str(path)], options())
    assert pool.stats["skipped"] == {"empty": 2, "invalid_utf8": 1, "non_english": 2}
    assert pool.stats["repaired"] == {"html": 1, "truncated": 1}
    assert pool.stats["captions_read"] == 7 and pool.stats["captions_used"] == 3  # the line not UTF-8 is not read
    assert counts(pool) == {"cat": 50, "bird": 1, "chip": 1, "fish": 1, "plate": 1}


def test_missing_spacy_model_is_one_line_user_error():
    with pytest.raises(UserError, match="spaCy model no_such_model is not installed: pip install") as error:
        resolve_model("no_such_model")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_two_workers_give_the_same_pool(tmp_path):
    corpus = write(tmp_path / "c.txt", [f"{n} dogs and a cat on a couch near a fire hydrant." for n in range(300)])
    one = build_pool([corpus], options(chunk_size=64))
    two = build_pool([corpus], options(chunk_size=64, workers=2))
    assert one.concepts == two.concepts and two.run["workers"] == 2
