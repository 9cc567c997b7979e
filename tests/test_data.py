"""CSV and webdataset loading of image-caption pairs, including bad samples and broken shards."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clipkd_dino.config import DataConfig
from clipkd_dino.data.pairs import TrainData
from clipkd_dino.data.samples import expand_shards
from clipkd_dino.errors import ConfigError
from clipkd_dino.models import create_model, get_tokenizer, image_transforms


@pytest.fixture(scope="module")
def student():
    model = create_model("toy-student")
    return get_tokenizer("toy-student"), image_transforms(model, augment=False)[0]


def batches(data: TrainData, epoch: int = 0) -> list[dict]:
    return list(data.epoch_batches(epoch))


def test_csv_pairs_visit_every_row_once_per_epoch(toyworld_dir, student):
    tokenizer, transform = student
    cfg = DataConfig(train=str(toyworld_dir / "train" / "captions.csv"), workers=0)
    data = TrainData(cfg, transform, tokenizer, batch_size=32)
    assert data.num_samples == 96 * 5 and data.steps_per_epoch == 15
    epoch = batches(data)
    assert len(epoch) == 15
    assert epoch[0]["images"].shape == (32, 3, 48, 48)
    assert epoch[0]["texts"].shape == (32, 32) and epoch[0]["texts"].dtype == torch.long
    # every caption ends with the end-of-text id, the largest of the vocabulary
    eot = tokenizer.vocab_size - 1
    assert all((row == eot).any() and row.max() == eot for row in epoch[0]["texts"])
    assert sum(sum(b["skipped"].values()) for b in epoch) == 0
    # a new epoch is a new order; the same epoch is the same order
    first = lambda e: batches(data, e)[0]["texts"]
    assert torch.equal(first(0), epoch[0]["texts"]) and not torch.equal(first(1), epoch[0]["texts"])


def test_csv_bad_rows_are_skipped_and_counted(tmp_path, toyworld_dir, student):
    tokenizer, transform = student
    good = (toyworld_dir / "train" / "captions.csv").read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [good[0]] + [r.replace("images/", str(toyworld_dir / "train" / "images") + "/") for r in good[1:31]]
    rows += [f"{tmp_path / 'broken.png'}\ta red star", f"{tmp_path / 'missing.png'}\ta blue moon",
             f"{rows[1].split(chr(9))[0]}\t  "]
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    data = TrainData(DataConfig(train=str(tmp_path / "bad.csv"), workers=0), transform, tokenizer, batch_size=11)
    epoch = batches(data)
    skipped = {}
    for batch in epoch:
        for reason, count in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    assert skipped == {"bad_image": 1, "missing_image": 1, "missing_caption": 1}
    assert sum(len(b["images"]) for b in epoch) == 30


def test_csv_missing_column_names_file_and_key(tmp_path, student):
    (tmp_path / "x.csv").write_text("path\tcaption\na.png\ta cat\n")
    with pytest.raises(ConfigError, match=r"x\.csv: column 'filepath' not found"):
        TrainData(DataConfig(train=str(tmp_path / "x.csv")), student[1], student[0], batch_size=1)


def test_webdataset_shards_from_brace_pattern_and_folder(toyworld_dir, student):
    tokenizer, transform = student
    shards = toyworld_dir / "train" / "shards"
    assert expand_shards(str(shards)) == expand_shards(str(shards / "train-{000000..000002}.tar"))
    cfg = DataConfig(train=str(shards), workers=0, shuffle_buffer=10)
    data = TrainData(cfg, transform, tokenizer, batch_size=16)
    assert data.num_samples == 96 and data.steps_per_epoch == 6
    epoch = batches(data)
    assert len(epoch) == 6 and all(b["images"].shape == (16, 3, 48, 48) for b in epoch)
    assert len(batches(data, 1)) == 6, "the stream continues into the next epoch"
    again = TrainData(cfg, transform, tokenizer, batch_size=16)
    assert torch.equal(batches(again)[0]["images"], epoch[0]["images"]), "same seed, same stream"


def test_webdataset_broken_shard_is_skipped_and_counted(tmp_path, toyworld_dir, student):
    tokenizer, transform = student
    source = sorted((toyworld_dir / "train" / "shards").glob("*.tar"))[0]
    good = tmp_path / "good.tar"
    good.write_bytes(source.read_bytes())
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(source.read_bytes()[:20000])
    (tmp_path / "sizes.json").write_text('{"good.tar": 32, "truncated.tar": 32}')
    cfg = DataConfig(train=f"{good}::{truncated}", workers=0, shuffle_buffer=4)
    data = TrainData(cfg, transform, tokenizer, batch_size=8)
    skipped = {}
    for epoch in range(3):
        for batch in data.epoch_batches(epoch):
            for reason, count in batch["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + count
    assert skipped.get("truncated_shard", 0) >= 1 and set(skipped) == {"truncated_shard"}


def test_webdataset_multiline_caption_draws_each_caption(tmp_path, student):
    from PIL import Image
    import webdataset as wds

    tokenizer, transform = student
    image = io.BytesIO()
    Image.new("RGB", (48, 48), "red").save(image, format="PNG")
    with wds.TarWriter(str(tmp_path / "one.tar")) as sink:
        for i in range(8):
            sink.write({"__key__": f"k{i}", "png": image.getvalue(), "txt": "a red circle\na red square\n"})
    cfg = DataConfig(train=str(tmp_path / "one.tar"), num_samples=8, workers=0, shuffle_buffer=1)
    data = TrainData(cfg, transform, tokenizer, batch_size=8)
    seen = {tuple(row.tolist()) for epoch in range(4) for b in data.epoch_batches(epoch) for row in b["texts"]}
    assert len(seen) == 2


def test_webdataset_without_sizes_needs_num_samples(tmp_path, student):
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.num_samples"):
        TrainData(DataConfig(train=str(tmp_path / "a.tar")), student[1], student[0], batch_size=1)


def webdataset(train: str, student, workers: int, views: bool = False, augment: bool = False, seed: int = 0,
               rank: int = 0, batch_size: int = 8, **cfg) -> TrainData:
    from clipkd_dino.data.pairs import PairImages
    from clipkd_dino.data.views import ViewSpec

    tokenizer, transform = student
    if augment:
        transform = image_transforms(create_model("toy-student"), augment=True, crop_scale=(0.3, 1.0))[0]
    images = PairImages(transform, ViewSpec(size=48, scale=(0.3, 1.0)), num_views=4) if views else PairImages(transform)
    config = DataConfig(train=train, workers=workers, **({"shuffle_buffer": 20} | cfg))
    return TrainData(config, images, tokenizer, batch_size=batch_size, rank=rank, seed=seed)


def described(batches: list[dict]) -> list[tuple]:
    """What a batch is made of: keys, caption and view draws, skipped counts (the pixels are compared apart)."""
    return [(b["keys"], b["caption_index"].tolist(), b["view"].tolist(), b["skipped"]) for b in batches]


def cursors_after(batches: list[dict]) -> dict[int, dict]:
    """What the trainer keeps for a resume: each stream's cursor from the last of `batches` it produced."""
    return {b["cursor"]["stream"]: b["cursor"] for b in batches}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("views, augment, epochs", [(True, False, "resampled"), (False, True, "exact")])
def test_webdataset_resumed_epoch_replays_the_uninterrupted_one(toyworld_dir, student, workers, views, augment,
                                                                epochs):
    shards = str(toyworld_dir / "train" / "shards")
    data = webdataset(shards, student, workers, views, augment, **({"num_samples": 160} if epochs == "resampled"
                                                                   else {"epochs": "exact"}))
    assert data.epochs == epochs
    full = list(data.epoch_batches(1))
    assert len(full) == data.steps_per_epoch == (20 if epochs == "resampled" else 12)
    assert all(len(b["keys"]) == 8 for b in full)
    assert all(0 <= c < 5 for b in full for c in b["caption_index"].tolist())
    assert {v for b in full for v in b["view"].tolist()} == ({0, 1, 2, 3} if views else {-1})
    assert len({c for b in full for c in b["caption_index"].tolist()}) > 1
    assert {b["cursor"]["stream"] for b in full} == set(range(max(workers, 1)))
    assert len({tuple(b["keys"]) for b in full}) == len(full), "each worker reads a stream of its own"
    restored = list(data.epoch_batches(1, skip_batches=7, cursors=cursors_after(full[:7])))
    replayed = list(data.epoch_batches(1, skip_batches=7))  # no cursors: each stream moves past its prefix
    assert described(restored) == described(replayed) == described(full[7:])
    for got, again, expected in zip(restored, replayed, full[7:]):
        assert torch.equal(got["images"], expected["images"]) and torch.equal(got["texts"], expected["texts"])
        assert torch.equal(again["images"], expected["images"])
    assert list(data.epoch_batches(1, skip_batches=data.steps_per_epoch)) == []


def test_webdataset_workers_read_each_shard_visit_once(toyworld_dir, student, monkeypatch):
    """W workers read W disjoint streams: the samples read per epoch are the samples given out plus the shuffle
    buffers' fill, not W times the stream. (Each worker's stream is run here, in this process, to count.)"""
    from clipkd_dino.data import pairs

    counted = []
    read = pairs.read_sample
    monkeypatch.setattr(pairs, "read_sample", lambda *args: counted.append(1) or read(*args))
    data = webdataset(str(toyworld_dir / "train" / "shards"), student, 0, num_samples=160, shuffle_buffer=4)
    for workers in (1, 2, 4):
        counted.clear()
        batches = []
        for stream in range(workers):
            monkeypatch.setattr(pairs, "get_worker_info", lambda: SimpleNamespace(id=stream, num_workers=workers))
            batches += list(pairs.WebdatasetEpoch(data.shards, data.images, data.tokenizer, data.batch_size, 4,
                                                  data.seed, 0, 0, 0, data.steps_per_epoch))
        given = sum(len(b["keys"]) + sum(b["skipped"].values()) for b in batches)
        assert len(batches) == 20 and given == 160
        assert len(counted) <= given + workers * 5  # plus at most a buffer (4) and one read ahead per stream


def test_webdataset_stream_depends_on_seed_rank_and_epoch(toyworld_dir, student):
    shards = str(toyworld_dir / "train" / "shards")
    keys = lambda data, epoch=0: [b["keys"] for b in data.epoch_batches(epoch)]
    data = webdataset(shards, student, 0, views=True)
    first = keys(data)
    assert keys(data) == first and keys(webdataset(shards, student, 0, views=True)) == first, "same seed, same stream"
    assert keys(data, 1) != first and keys(data, 2) != keys(data, 1), "every epoch is a new stream"
    assert keys(webdataset(shards, student, 0, views=True, seed=1)) != first
    assert keys(webdataset(shards, student, 0, views=True, rank=1)) != first
    draws = lambda data: [(b["caption_index"].tolist(), b["view"].tolist()) for b in data.epoch_batches(0)]
    buffer_one = webdataset(shards, student, 0, views=True, shuffle_buffer=1)  # the shards' own order
    assert draws(buffer_one) == draws(webdataset(shards, student, 0, views=True, shuffle_buffer=1))


def test_webdataset_resume_reads_and_decodes_only_what_is_left(toyworld_dir, student, monkeypatch):
    from clipkd_dino.data import pairs

    decoded, read = [], []
    decode, read_sample = pairs._decode_raw, pairs.read_sample
    monkeypatch.setattr(pairs, "_decode_raw", lambda *args: decoded.append(1) or decode(*args))
    monkeypatch.setattr(pairs, "read_sample", lambda *args: read.append(1) or read_sample(*args))
    data = webdataset(str(toyworld_dir / "train" / "shards"), student, 0, num_samples=96, batch_size=16)
    done = list(data.epoch_batches(0))[:4]
    decoded.clear(), read.clear()
    assert len(list(data.epoch_batches(0, skip_batches=4, cursors=cursors_after(done)))) == 2
    assert len(decoded) == 2 * 16
    assert len(read) <= 20 + 2 * 16 + 2  # the shuffle buffer (20) restored, then the samples of the 2 batches
    read.clear()
    # no cursors: the stream moves past its prefix through the shard indexes, reading only the samples after it
    assert len(list(data.epoch_batches(0, skip_batches=4))) == 2 and len(read) <= 20 + 2 * 16 + 2


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_broken_members_are_counted_once_whatever_the_resume(tmp_path, toyworld_dir, student, workers):
    source = sorted((toyworld_dir / "train" / "shards").glob("*.tar"))[0]
    (tmp_path / "good.tar").write_bytes(source.read_bytes())
    (tmp_path / "truncated.tar").write_bytes(source.read_bytes()[:20000])
    train = f"{tmp_path / 'good.tar'}::{tmp_path / 'truncated.tar'}"
    data = webdataset(train, student, workers, num_samples=400, shuffle_buffer=4)
    reference = list(data.epoch_batches(0))
    bad = [i for i, b in enumerate(reference) if b["skipped"].get("truncated_shard")]
    assert len(bad) >= 2 and bad[-1] >= 1, "the test needs broken members after the resume point"
    resume = bad[-1] - 1
    assert described(list(data.epoch_batches(0))) == described(reference)
    restored = list(data.epoch_batches(0, skip_batches=resume, cursors=cursors_after(reference[:resume])))
    assert described(restored) == described(reference[resume:])


def epoch_identities(shards: str, student, processes: int, workers: int, batch_size: int, stop_after: int | None = None,
                     epoch: int = 0) -> tuple[list[str], list[TrainData]]:
    """The sample identities of an epoch read by `processes` ranks of `workers` loader workers each (real workers);
    with `stop_after`, each rank stops after that many batches and resumes from its cursors (a kill and resume)."""
    identities, ranks = [], []
    for rank in range(processes):
        config = DataConfig(train=shards, workers=workers, shuffle_buffer=20)
        data = TrainData(config, student[1], student[0], batch_size=batch_size, rank=rank, world_size=processes)
        read = list(data.epoch_batches(epoch)) if stop_after is None else list(
            itertools.islice(data.epoch_batches(epoch), stop_after))
        if stop_after is not None:
            read += list(data.epoch_batches(epoch, skip_batches=stop_after, cursors=cursors_after(read)))
        identities += [key for batch in read for key in batch["keys"]]
        ranks.append(data)
    return identities, ranks


def test_exact_epoch_reads_every_sample_once_across_processes_and_workers(toyworld_dir, student):
    shards = str(toyworld_dir / "train" / "shards")
    identities, ranks = epoch_identities(shards, student, processes=2, workers=2, batch_size=8)
    assert all(data.epochs == "exact" for data in ranks)
    assert len(identities) == 96 and len(set(identities)) == 96, "each of the 96 samples once, on one worker"
    resumed, _ = epoch_identities(shards, student, processes=2, workers=2, batch_size=8, stop_after=3)
    assert sorted(resumed) == sorted(identities), "a kill and resume mid-epoch reads the rest once"
    following, _ = epoch_identities(shards, student, processes=2, workers=2, batch_size=8, epoch=1)
    assert sorted(following) == sorted(identities) and following != identities, "a new order each epoch"
    # uneven shares: 96 samples over 2 x 2 streams of 24 = 4 batches of 5 each, the same count on every rank
    uneven, ranks = epoch_identities(shards, student, processes=2, workers=2, batch_size=5)
    assert [data.steps_per_epoch for data in ranks] == [8, 8]
    assert len(uneven) == len(set(uneven)) == 2 * 8 * 5


def test_exact_epoch_reads_each_shard_byte_about_once(tmp_path, toyworld_dir, student):
    """Bytes read by the process over an exact epoch (rchar: headers indexed, members read at their exact size)."""
    shards = toyworld_dir / "train" / "shards"
    size = sum(path.stat().st_size for path in shards.glob("*.tar"))
    data = webdataset(str(shards), student, 0, epochs="exact", batch_size=16)

    def rchar() -> int:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar")).split()[1])

    before = rchar()
    assert sum(len(batch["keys"]) for batch in data.epoch_batches(0)) == 96
    assert rchar() - before <= 1.15 * size


def test_epoch_mode_errors_name_the_key(tmp_path, toyworld_dir, student):
    shards = str(toyworld_dir / "train" / "shards")
    with pytest.raises(ConfigError, match="'data.num_samples'.*unset it"):
        webdataset(shards, student, 0, epochs="exact", num_samples=160)
    (tmp_path / "a.tar").write_bytes((toyworld_dir / "train" / "shards" / "train-000000.tar").read_bytes())
    with pytest.raises(ConfigError, match="exact epochs need every shard's size: .*a.tar is not listed"):
        webdataset(str(tmp_path / "a.tar"), student, 0, epochs="exact")
    assert webdataset(str(tmp_path / "a.tar"), student, 0, num_samples=32).epochs == "resampled"
