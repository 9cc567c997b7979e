"""Export a CLIP model as an open_clip `local-dir:` folder: `open_clip.create_model_and_transforms('local-dir:DIR')`
loads it.

The folder holds exactly two files: `open_clip_config.json` ({"model_cfg": the full architecture, "preprocess_cfg":
the eval preprocessing}) and `open_clip_model.safetensors` (the CLIP weights, token table spread over open_clip's
BPE ids: no projector, no optimiser).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from clipkd_dino.export.common import check_folder, with_openclip_vocabulary
from clipkd_dino.files import write_atomic
from clipkd_dino.models.factory import OPENCLIP_VOCAB_SIZE, model_config

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
OWN_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what a folder may already hold: an earlier export is overwritten


def export_model(model: torch.nn.Module, name: str, out_dir: str | Path) -> Path:
    """Write `model` (architecture `name`) to `out_dir` as an open_clip local-dir model; returns the folder."""
    out_dir = Path(out_dir)
    check_folder(out_dir, "out", OWN_FILES)
    config = model_config(name)
    config["text_cfg"]["vocab_size"] = OPENCLIP_VOCAB_SIZE
    weights = {key: tensor.detach().cpu().contiguous()
               for key, tensor in with_openclip_vocabulary(model, name).state_dict().items()}
    preprocess = dict(model.visual.preprocess_cfg)
    text = json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2) + "\n"
    data = save(weights, metadata={"format": "pt", "architecture": name})
    write_atomic(out_dir / WEIGHTS_FILE, lambda stream: stream.write(data))
    write_atomic(out_dir / CONFIG_FILE, lambda stream: stream.write(text.encode("utf-8")))
    return out_dir

