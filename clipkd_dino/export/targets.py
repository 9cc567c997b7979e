"""`export_targets`: one checkpoint to any of the three targets (open_clip folder, ONNX towers, transformers
CLIPModel), every refusal made before any weights are read."""

from __future__ import annotations

from pathlib import Path

from clipkd_dino.errors import UserError
from clipkd_dino.export.common import bpe_tokenizer, check_folder
from clipkd_dino.export.hf_clip import export_hf, hf_config
from clipkd_dino.export.onnx_towers import export_onnx
from clipkd_dino.export.open_clip_folder import OWN_FILES, export_model
from clipkd_dino.models.factory import checkpoint_model_name, create_model

EXPORTERS = {"out": export_model, "onnx": export_onnx, "hf": export_hf}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Export the CLIP model of a checkpoint (any our trainer writes; `name` defaults to its `model_name`) as an
    open_clip local-dir folder; returns the folder."""
    return export_targets(checkpoint, name, out=out_dir)["out"]


def export_targets(checkpoint: str | Path, name: str | None = None, *, out: str | Path | None = None,
                   onnx: str | Path | None = None, hf: str | Path | None = None) -> dict[str, Path]:
    """Export the CLIP model of a checkpoint to each folder given: `out` (open_clip local-dir), `onnx` (ONNX image
    and text towers, checked in onnxruntime), `hf` (transformers CLIPModel, checked against open_clip).

    Every folder must be new or empty and the folders distinct; an architecture transformers cannot hold, or a
    tokenizer other than open_clip's BPE for ONNX or transformers, is refused before any weights are read. Returns
    {target: folder} for the targets given.
    """
    targets = {flag: Path(folder) for flag, folder in (("out", out), ("onnx", onnx), ("hf", hf)) if folder}
    if not targets:
        raise UserError("give at least one target: --out DIR (open_clip), --onnx DIR or --hf DIR")
    if len({folder.absolute() for folder in targets.values()}) < len(targets):
        raise UserError(f"give each target its own folder (got {', '.join(map(str, targets.values()))})")
    for flag, folder in targets.items():
        check_folder(folder, flag, OWN_FILES if flag == "out" else ())
    name = name or checkpoint_model_name(checkpoint)
    if targets.keys() & {"onnx", "hf"}:
        bpe_tokenizer(name)
    if "hf" in targets:
        hf_config(name)
    model = create_model(name, str(checkpoint)).eval()
    return {flag: EXPORTERS[flag](model, name, folder) for flag, folder in targets.items()}
