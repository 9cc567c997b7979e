"""Caption sources and cleaning (no spaCy): every format, digests, the training data syntax and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from clipkd_dino.concepts.clean import CaptionCleaner
from clipkd_dino.concepts.sources import ReaderOptions, expand_sources, read_captions
from clipkd_dino.errors import UserError

CAPTIONS = ["A dog on a couch.", "Two cats sleeping.", "A red fire hydrant."]


def read_all(path: Path, options: ReaderOptions = ReaderOptions()) -> tuple[list[str], Counter, str]:
    (source,) = expand_sources([str(path)])
    problems: Counter = Counter()
    captions = list(read_captions(source, options, problems))
    assert source.captions == len(captions)
    return captions, problems, source.sha256


def write_shard(path: Path, captions: list[str], truncate: bool = False) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, caption in enumerate(captions):
            for suffix, data in ((".jpg", b"\xff\xd8 not really a jpeg"), (".txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:06d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data[:2600] if truncate else data)
    return path


def test_text_reader_keeps_lines_and_hashes_the_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\n".join(CAPTIONS).encode() + b"\r\n\n")
    captions, problems, digest = read_all(path)
    assert captions == [*CAPTIONS, ""]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_csv_reader_uses_open_clip_defaults_and_flags(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("filepath\ttitle\n" + "".join(f"{i}.jpg\t{c}\n" for i, c in enumerate(CAPTIONS)))
    assert read_all(tsv)[0] == CAPTIONS
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('caption,url\n"A dog, brown",x\nshort row\n\nA cat,y\n')
    captions, problems, _ = read_all(csv_path, ReaderOptions(csv_separator=",", csv_caption_key="caption"))
    assert captions == ["A dog, brown", "A cat"] or captions == ["A dog, brown", "short row", "A cat"]
    with pytest.raises(UserError, match="no caption column 'title'"):
        read_all(csv_path)


def test_coco_reader_and_its_errors(tmp_path):
    path = tmp_path / "captions.json"
    annotations = [{"image_id": i, "id": i, "caption": c} for i, c in enumerate(CAPTIONS)] + [{"id": 9}]
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    captions, problems, _ = read_all(path)
    assert captions == CAPTIONS and problems == {"bad_record": 1}
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="not a COCO captions file"):
        read_all(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_all(path)


def test_jsonl_reader_counts_bad_lines_and_rejects_a_wrong_key(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join([json.dumps({"caption": c}) for c in CAPTIONS] + ["{oops", "", '{"caption": 3}']))
    captions, problems, _ = read_all(path)
    assert captions == CAPTIONS and problems == {"bad_record": 2, "empty": 1}
    path.write_text(json.dumps({"text": "a dog"}) + "\n")
    with pytest.raises(UserError, match="jsonl-caption-key"):
        read_all(path)
    assert read_all(path, ReaderOptions(jsonl_caption_key="text"))[0] == ["a dog"]


def test_webdataset_shards_through_a_brace_pattern(tmp_path):
    write_shard(tmp_path / "shard-000.tar", CAPTIONS[:2])
    write_shard(tmp_path / "shard-001.tar", CAPTIONS[2:])
    sources = expand_sources([str(tmp_path / "shard-{000..001}.tar")])
    assert [s.path.name for s in sources] == ["shard-000.tar", "shard-001.tar"]
    problems: Counter = Counter()
    assert [c for s in sources for c in read_captions(s, ReaderOptions(), problems)] == CAPTIONS
    assert sources[0].sha256 == hashlib.sha256((tmp_path / "shard-000.tar").read_bytes()).hexdigest()


def test_training_data_syntax_folder_and_joined_sets(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, caption in enumerate(CAPTIONS):
        write_shard(shards / f"s-{i}.tar", [caption])
    (shards / "sizes.json").write_text("{}")
    (tmp_path / "more.txt").write_text("a cat\n")
    assert [s.path.name for s in expand_sources([str(shards)])] == ["s-0.tar", "s-1.tar", "s-2.tar"]
    joined = expand_sources([f"{shards}/s-{{0..1}}.tar::{tmp_path / 'more.txt'}::{shards}"])
    assert [s.path.name for s in joined] == ["s-0.tar", "s-1.tar", "more.txt", "s-0.tar", "s-1.tar", "s-2.tar"]
    assert [s.format for s in joined[1:3]] == ["webdataset", "text"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.tar shards in .*empty"):
        expand_sources([str(tmp_path / "empty")])


def test_shard_text_member_holds_one_caption_a_line(tmp_path):
    assert read_all(write_shard(tmp_path / "s.tar", ["a dog\na cat\n", ""]))[0] == ["a dog", "a cat", ""]


def test_truncated_shard_is_counted_not_fatal(tmp_path):
    path = write_shard(tmp_path / "broken.tar", CAPTIONS * 3, truncate=True)
    captions, problems, digest = read_all(path)
    assert captions == CAPTIONS[:1] and problems == {"truncated_shard": 1}
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_and_unknown_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.txt"):
        expand_sources([str(tmp_path / "nope.txt")])
    (tmp_path / "c.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="unknown caption source format"):
        expand_sources([str(tmp_path / "c.parquet")])


def test_cleaner_repairs_and_skips_by_reason():
    problems: Counter = Counter()
    clean = CaptionCleaner(max_chars=40, problems=problems)
    assert clean("Fish &amp; chips on a <b>plate</b>") == "Fish & chips on a plate"
    assert clean("  a\tdog\x00 on   a bed ") == "a dog on a bed"
    assert clean("A dog " + "and a cat " * 20) == "A dog and a cat and a cat and a cat and"
    for bad in ("", "   "):
        assert clean(bad) is None
    assert clean("caf\ufffd au lait") == "caf\ufffd au lait"  # valid UTF-8: decoding alone judges bytes
    assert clean("Un chien noir sur la plage avec une balle") is None
    assert clean("一只狗在沙滩上奔跑") is None
    assert clean("A café with a crêpe on the table") == "A café with a crêpe on the table"
    assert clean("A man at the Café de la Paix in Paris") is not None
    assert problems == {"html": 1, "truncated": 1, "empty": 2, "non_english": 2}


def test_invalid_utf8_lines_are_skipped_not_fatal(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"a dog\n\xff\xfe broken \xc3\n")
    captions, problems, _ = read_all(path)
    assert captions == ["a dog"] and problems == {"invalid_utf8": 1}
    (tmp_path / "c.tsv").write_bytes(b"filepath\ttitle\na.jpg\ta cat\nb.jpg\tbad \xff byte\n")
    (tmp_path / "c.jsonl").write_bytes(b'{"caption": "bad \xff"}\n{"caption": "a bird", "x": "\xc3"}\n')
    for name, kept in (("c.tsv", ["a cat"]), ("c.jsonl", ["a bird"])):  # the caption is judged, not the record
        assert read_all(tmp_path / name)[:2] == (kept, Counter(invalid_utf8=1))
