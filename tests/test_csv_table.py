"""The CSV table: csv.DictReader's rows, keys, caption indices and UTF-8 flags, in numpy arrays only."""

from __future__ import annotations

import csv
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clipkd_dino.data import csv_table, samples
from clipkd_dino.data.csv_table import CsvTable
from clipkd_dino.data.samples import list_units, unit_samples

# quotes (a tab, a newline and a doubled quote inside), repeated images, blank captions, a short row, an empty line,
# rows that are not UTF-8 (in the image path; in the caption of an image whose later row is UTF-8), no final newline
TRICKY = (b'filepath\ttitle\textra\n'
          b'a.jpg\ta cat\tx\n'
          b'f.jpg\tnot \xfe UTF-8 first\n'
          b'b.jpg\t"a ""quoted"" dog\twith a tab"\n'
          b'a.jpg\t\n'
          b'c.jpg\t"two\nlines"\n'
          b'\n'
          b'a.jpg\t  \xc2\xa0 \n'
          b'b.jpg\tbad \xff byte\n'
          b'd\xe9.jpg\tlatin-1 path\n'
          b'd\xe9.jpg\tagain\n'
          b'a.jpg\tanother cat\n'
          b'e.jpg\n'
          b'g\xc3\t\xa9: neither field is UTF-8, both together would be\n'
          b'c.jpg\tthird\t\t\n'
          b'f.jpg\tthen UTF-8')


def dictreader_rows(path: Path) -> list[tuple[str, str]]:
    """The reference: the rows as csv.DictReader reads them (the readers this table replaced)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return [(row["filepath"] or "", row["title"] or "") for row in csv.DictReader(handle, delimiter="\t")]


def is_utf8(text: str) -> bool:
    """The old check: text read with errors="surrogateescape" encodes back only when its bytes were UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def expected_rows(path: Path) -> list[tuple[str, str, bool, int]]:
    """(image, caption, UTF-8, caption index) per row, as the old CsvPairs computed them."""
    seen: Counter = Counter()
    out = []
    for image, caption in dictreader_rows(path):
        utf8 = is_utf8(image + caption)
        out.append((image, caption, utf8, seen[image]))
        seen[image] += bool(caption.strip()) and utf8
    return out


def table_rows(table: CsvTable) -> list[tuple[str, str, bool, int]]:
    return [(table.image_path(i), table.caption(i), table.utf8(i), int(table.caption_index[i]))
            for i in range(len(table))]


@pytest.mark.parametrize("block_bytes", [1 << 24, 5])
@pytest.mark.parametrize("quoted", [True, False])
def test_csv_table_reads_what_dictreader_reads(tmp_path, monkeypatch, block_bytes, quoted):
    data = TRICKY if quoted else TRICKY.replace(b'"', b"").replace(b"two\nlines", b"two lines")
    (tmp_path / "data.csv").write_bytes(data)
    monkeypatch.setattr(csv_table, "BLOCK_BYTES", block_bytes)  # 5: lines longer than a block, quotes found late
    table = CsvTable.read(tmp_path / "data.csv")
    expected = expected_rows(tmp_path / "data.csv")
    assert table_rows(table) == expected
    assert len(table) == 14 and [row[2] for row in expected].count(False) == 5
    assert table.caption(2) == ('a "quoted" dog\twith a tab' if quoted else "a quoted dog")


@pytest.mark.parametrize("header", [b"filepath\ttitle", b'"filepath"\ttitle\n'])
def test_csv_table_of_a_header_alone_is_empty(tmp_path, header):
    (tmp_path / "data.csv").write_bytes(header)
    assert len(CsvTable.read(tmp_path / "data.csv")) == 0
    units = list_units(str(tmp_path / "data.csv"))
    assert len(units) == 1 and unit_samples(units[0], Counter()) == ()


def test_csv_labelling_units_group_the_rows_of_each_image(tmp_path, monkeypatch):
    (tmp_path / "data.csv").write_bytes(TRICKY)
    monkeypatch.setattr(samples, "CSV_UNIT_SIZE", 2)
    units = list_units(str(tmp_path / "data.csv"))
    problems: Counter = Counter()
    refs = [ref for unit in units for ref in unit_samples(unit, problems)]
    grouped: dict[str, list[str]] = {}  # the old labelling reader: UTF-8 rows by image, blank captions left out
    for image, caption in dictreader_rows(tmp_path / "data.csv"):
        if is_utf8(image + caption):
            grouped.setdefault(image, []).extend([caption] if caption.strip() else [])
    assert [(r.key, r.image_path, r.captions) for r in refs] == [
        (key, str(tmp_path / key), tuple(captions)) for key, captions in grouped.items()]
    assert [unit.name for unit in units] == ["data/000000", "data/000001", "data/000002"]
    assert problems == {"invalid_utf8": 5}
    assert [r.key for r in refs] == ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "f.jpg"]  # f.jpg: at its first UTF-8 row
    assert refs[0].captions == ("a cat", "another cat") and refs[3].captions == ()  # "  \xa0 " is blank


def test_csv_table_holds_no_object_per_row(tmp_path):
    def held(rows: int) -> tuple[CsvTable, int, int]:
        path = tmp_path / f"{rows}.csv"
        lines = [f"images/{i // 2:06d}.jpg\ta photo of thing number {i} on a table" for i in range(rows)]
        path.write_text("filepath\ttitle\n" + "\n".join(lines) + "\n")
        tracemalloc.start()
        table = CsvTable.read(path)
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return table, size, sum(len(line) - 1 for line in lines)

    for rows in (2_000, 40_000):
        table, size, text = held(rows)
        assert all(isinstance(value, np.ndarray) and value.dtype != object for value in vars(table).values())
        assert len(table) == rows and table.caption_index[:4].tolist() == [0, 1, 0, 1]
        assert (size - text) / rows < 40, f"{size - text} bytes held beyond the text for {rows} rows"
