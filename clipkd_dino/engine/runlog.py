"""A run's logs: `log.jsonl` (training scalars), `metrics.jsonl` (evaluations), TensorBoard, all from rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLog:
    """Appends JSON lines and mirrors every number to TensorBoard; a no-op object on ranks other than 0."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.output_dir, self.writer = output_dir, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            output_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def train(self, record: dict[str, Any]) -> None:
        """record: {"step", "epoch", name: value, ...} -> log.jsonl and train/NAME in TensorBoard."""
        self._write("log.jsonl", "train/", record)

    def metrics(self, record: dict[str, Any]) -> None:
        """record: {"step", "epoch", nested metrics} -> metrics.jsonl and val/PATH in TensorBoard."""
        self._write("metrics.jsonl", "val/", record)

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    def _write(self, file: str, prefix: str, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        with open(self.output_dir / file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("step", "epoch")}
        for name, value in flatten_numbers(scalars).items():
            self.writer.add_scalar(prefix + name, value, record["step"])


def flatten_numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1}} -> {"a/b": 1.0}; non-numbers are left out."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten_numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat
