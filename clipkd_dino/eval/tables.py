"""Markdown tables of `clipkd eval` reports: one column per model, one row per metric."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from clipkd_dino.errors import UserError

PROTOCOL_ORDER = ("any_caption", "one_to_one")


def markdown_table(reports: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """The reports side by side; a metric a report lacks shows as '-'. Data rows name each set's digest."""
    rows: list[tuple[str, list[str]]] = []
    retrieval = [report.get("retrieval") or {} for report in reports]
    if any(retrieval):
        rows.append(("retrieval data", [_retrieval_data(part) for part in retrieval]))
        for protocol in PROTOCOL_ORDER:
            for metric in _keys(part.get(protocol) for part in retrieval):
                rows.append((f"{protocol} {metric.replace('_', ' ')}",
                             [_number((part.get(protocol) or {}).get(metric)) for part in retrieval]))
    zeroshot = [report.get("zeroshot") or {} for report in reports]
    if any(zeroshot):
        rows.append(("zero-shot data", [_zeroshot_data(part) for part in zeroshot]))
        rows.extend((f"zero-shot {metric}", [_number(part.get(metric)) for part in zeroshot])
                    for metric in ("top1", "top5"))
    lines = ["| metric (%) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines.extend(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows)
    return "\n".join(lines)


def compare_reports(paths: Sequence[str | Path]) -> str:
    """The table of several report files, with a warning line when they scored different data."""
    reports = [read_report(path) for path in paths]
    labels = [str(report.get("label") or report.get("model") or Path(path).stem)
              for report, path in zip(reports, paths)]
    if len(set(labels)) < len(labels):
        labels = [str(path) for path in paths]
    table = markdown_table(reports, labels)
    for part in ("retrieval", "zeroshot"):
        digests = {(report.get(part) or {}).get("digest") for report in reports if report.get(part)}
        if len(digests) > 1:
            table += f"\n\nwarning: the {part} data differ between these reports (digests {sorted(digests)})"
    return table


def read_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"report not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read report {path}: {error}") from None
    if not isinstance(report, dict) or not ("retrieval" in report or "zeroshot" in report):
        raise UserError(f"{path}: not a clipkd eval report (no 'retrieval' or 'zeroshot')")
    return report


def _keys(parts) -> list[str]:
    keys: dict[str, None] = {}
    for part in parts:
        keys.update(dict.fromkeys(part or ()))
    return list(keys)


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _skipped(part: dict[str, Any]) -> str:
    return f", {part['skipped_images']} skipped" if part.get("skipped_images") else ""


def _retrieval_data(part: dict[str, Any]) -> str:
    if not part:
        return "-"
    return (f"{part.get('format', '?')} {part['num_images']} img / {part['num_captions']} cap "
            f"{str(part.get('digest', ''))[:12]}{_skipped(part)}")


def _zeroshot_data(part: dict[str, Any]) -> str:
    if not part:
        return "-"
    return (f"{part['num_samples']} img / {part['num_classes']} classes "
            f"{str(part.get('digest', ''))[:12]}{_skipped(part)}")
