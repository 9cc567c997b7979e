"""`clipkd demo --smoke`: every stage of the main job on tiny data, ending in a report with its tables and plots."""

from __future__ import annotations

import json

from conftest import clipkd


def test_smoke_demo_writes_the_report_and_plots(tmp_path):
    result = clipkd("demo", "--smoke", "--data", str(tmp_path / "toyworld"), "--out", str(tmp_path / "demo"),
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo"
    report = (out / "report.md").read_text()
    for row in ("teacher (toy-teacher)", "student: no teacher", "student: CLIP-KD |", "student: CLIP-KD + dino"):
        assert row in report
    assert "Against toyworld's ground truth" in report and "| coverage | min margin | precision |" in report
    for plot in ("curves.png", "norms.png", "labels/stats.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG"), plot
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["students"]] == ["no teacher", "CLIP-KD", "CLIP-KD + dino"]
    assert sorted(summary["pool"]) == sorted(json.loads((tmp_path / "toyworld" / "val" / "zeroshot" /
                                                         "classnames.json").read_text()))
    geometry = summary["geometry"]
    assert "cosine_teacher_means" in geometry["CLIP-KD + dino#0"]
    assert "cosine_teacher_means" not in geometry["CLIP-KD#0"]
    dino_log = (out / "students" / "clip-kd_dino_seed0" / "log.jsonl").read_text().splitlines()
    logs = [json.loads(line) for line in dino_log]
    assert "loss_dino" in logs[-1] and "loss_dino" not in json.loads(
        (out / "students" / "clip-kd_seed0" / "log.jsonl").read_text().splitlines()[-1])
