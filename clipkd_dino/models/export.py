"""Export a CLIP model as an open_clip `local-dir:` folder that plain open_clip (and CLIP_benchmark) loads.

The folder holds exactly two files: `open_clip_config.json` ({"model_cfg": the full architecture, "preprocess_cfg":
the eval preprocessing}) and `open_clip_model.safetensors` (the CLIP weights: no projector, no optimiser). A model
with a compact vocabulary (toy models) gets its token table spread over open_clip's 49,408 BPE ids, each id taking
the row the compact tokenizer maps it to, so open_clip's own tokenizer gives the same text features.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from clipkd_dino.errors import UserError
from clipkd_dino.files import write_atomic
from clipkd_dino.models.factory import (
    OPENCLIP_VOCAB_SIZE,
    checkpoint_model_name,
    create_model,
    get_tokenizer,
    model_config,
)
from clipkd_dino.models.tokenizer import CompactTokenizer

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Export the CLIP model of a checkpoint (any our trainer writes; `name` defaults to its `model_name`)."""
    name = name or checkpoint_model_name(checkpoint)
    return export_model(create_model(name, str(checkpoint)), name, out_dir)


def export_model(model: torch.nn.Module, name: str, out_dir: str | Path) -> Path:
    """Write `model` (architecture `name`) to `out_dir` as an open_clip local-dir model; returns the folder."""
    out_dir = Path(out_dir)
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE)) \
        if out_dir.is_dir() else []
    if others or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"--out {out_dir}: must be a new or empty folder (it holds {others or 'a file'})")
    config = model_config(name)
    weights = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    tokenizer = get_tokenizer(name)
    if isinstance(tokenizer, CompactTokenizer):
        key = next(k for k in weights if k.endswith("token_embedding.weight"))
        weights[key] = weights[key][tokenizer.lookup]
        config["text_cfg"]["vocab_size"] = OPENCLIP_VOCAB_SIZE
    preprocess = dict(model.visual.preprocess_cfg)
    text = json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2) + "\n"
    data = save(weights, metadata={"format": "pt", "architecture": name})
    write_atomic(out_dir / WEIGHTS_FILE, lambda stream: stream.write(data))
    write_atomic(out_dir / CONFIG_FILE, lambda stream: stream.write(text.encode("utf-8")))
    return out_dir
