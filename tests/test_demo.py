"""`clipkd demo`: the paired statistics both demos report, the classification demo end to end, and a bad student
name refused before any work. The CLIP smoke demo runs once in the suite, from the installed wheel
(tests/test_wheel.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clipkd_dino.report import (interval_verdict, paired_difference, paired_table, paired_words, t_quantile,
                                t_two_sided)
from conftest import clipkd


@pytest.mark.parametrize("df, expected", [
    (1, math.tan(0.975 * math.pi - math.pi / 2)),  # Cauchy: F(t) = 1/2 + atan(t)/pi
    (2, math.sqrt(2 * 0.95**2 / (1 - 0.95**2))),  # F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    (4, 2.7764451051977987),  # textbook tables (Fisher and Yates), to their 10 digits
    (30, 2.0422724563012373),
])
def test_t_quantile_matches_closed_forms_and_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9)


def test_t_two_sided_is_the_integral_of_the_t_density():
    for df in (3, 6, 7):
        x = torch.linspace(-1.7, 1.7, 200_001, dtype=torch.float64)
        density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * \
            (1 + x**2 / df) ** (-(df + 1) / 2)
        assert t_two_sided(1.7, df) == pytest.approx(float(torch.trapezoid(density, x)), abs=1e-9)


def test_paired_difference_and_its_interval():
    paired = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])  # diffs 1, 2, 3: mean 2, sd 1
    half = t_quantile(0.975, 2) / math.sqrt(3)
    assert paired["diffs"] == [1.0, 2.0, 3.0] and paired["mean"] == 2.0 and paired["sd"] == 1.0
    assert (paired["low"], paired["high"]) == pytest.approx((2 - half, 2 + half))
    assert interval_verdict(paired) == "includes 0"  # half = 2.48
    assert interval_verdict(paired_difference([5.0, 5.1, 4.9, 5.0], [1.0, 1.0, 1.0, 1.0])) == "excludes 0 (higher)"
    assert interval_verdict(paired_difference([1.0, 1.1], [3.0, 3.0])) == "excludes 0 (lower)"
    one = paired_difference([2.0], [1.0])
    assert one["low"] is None and interval_verdict(one) == "needs ≥ 2 seeds"
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])
    table = paired_table({"top-1": ([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])}, "B", "A")
    assert "| top-1 | 12.00 ± 1.00 | 10.00 ± 0.00 | +2.00 | [-0.48, +4.48] | +1.00, +2.00, +3.00 | includes 0 |" \
        in table


def test_paired_words_name_the_metrics_whose_interval_excludes_0():
    rows = {"a": ([5.0, 5.1, 4.9], [1.0, 1.0, 1.0]), "b": ([1.0, 3.0, 2.0], [2.0, 2.0, 2.0])}
    assert paired_words(rows) == ("Over 3 paired seeds the 95% interval excludes 0 for a (higher); the others "
                                  "include 0 (no difference shown).")
    assert paired_words({"b": rows["b"]}) == "Over 3 paired seeds every 95% interval includes 0: no difference shown."
    assert paired_words({"b": ([1.0], [2.0])}).startswith("1 seed: a paired interval needs at least 2 seeds")


def _report_and_summary(out):
    return (out / "report.md").read_text(), json.loads((out / "summary.json").read_text())


def test_unknown_student_stops_before_any_work(tmp_path):
    result = clipkd("demo", "--smoke", "--student", "no-such-model", "--data", str(tmp_path / "toyworld"))
    assert result.returncode == 2 and "no-such-model" in result.stderr
    assert not (tmp_path / "toyworld").exists()


@pytest.mark.slow
def test_cls_demo_reports_kd_plus_plus_minus_kd_paired(tmp_path):
    result = clipkd("demo", "--cls", "--smoke", "--seeds", "2", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    report, summary = _report_and_summary(tmp_path / "demo")
    top1 = {(s["name"], s["seed"]): s["last_top1"] for s in summary["students"]}
    paired = summary["paired"]["val top-1 (%), last epoch"]
    assert paired["diffs"] == pytest.approx([top1["KD++", s] - top1["KD", s] for s in (0, 1)])
    assert paired["n"] == 2 and paired["low"] <= paired["mean"] <= paired["high"]
    assert "| metric | KD++ | KD | paired diff, mean | 95% interval |" in report
    assert "Over 2 paired seeds" in report
    for name in ("student: KD |", "student: KD++ |", "student: no teacher |"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {name}"))
        assert row.count("±") == 2, row
    assert (tmp_path / "demo" / "accuracy.png").stat().st_size > 10_000
    assert summary["table"]["KD++"]["runs"] == 2
