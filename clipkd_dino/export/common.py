"""Export a CLIP model for clients that do not use this package: an open_clip `local-dir:` folder, ONNX towers
(`onnx_towers.py`) and a transformers `CLIPModel` folder (`hf_clip.py`).

The open_clip folder holds exactly two files: `open_clip_config.json` ({"model_cfg": the full architecture,
"preprocess_cfg": the eval preprocessing}) and `open_clip_model.safetensors` (the CLIP weights: no projector, no
optimiser). A model with a compact vocabulary (toy models) gets its token table spread over open_clip's 49,408 BPE
ids, each id taking the row the compact tokenizer maps it to, so open_clip's own tokenizer gives the same text
features; every target gets this spread table, so every client feeds plain open_clip BPE ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Collection, Iterator

import torch
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
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
RESIZE_MODES = {  # open_clip's eval resize modes
    "shortest": "resize the short side to {size} px, centre crop {size} x {size}",
    "longest": "resize the long side to {size} px, pad to {size} x {size} with {fill}",
    "squash": "resize to {size} x {size} (aspect ratio not kept)",
}
OUTSIDE_TOY_VOCABULARY = "A photo of an old bicycle leaning on a wall, next to 3 dogs!"


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
    from clipkd_dino.export.hf_clip import export_hf, hf_config
    from clipkd_dino.export.onnx_towers import export_onnx

    targets = {flag: Path(folder) for flag, folder in (("out", out), ("onnx", onnx), ("hf", hf)) if folder}
    if not targets:
        raise UserError("give at least one target: --out DIR (open_clip), --onnx DIR or --hf DIR")
    if len({folder.absolute() for folder in targets.values()}) < len(targets):
        raise UserError(f"give each target its own folder (got {', '.join(map(str, targets.values()))})")
    for flag, folder in targets.items():
        check_folder(folder, flag, (CONFIG_FILE, WEIGHTS_FILE) if flag == "out" else ())
    name = name or checkpoint_model_name(checkpoint)
    if targets.keys() & {"onnx", "hf"}:
        bpe_tokenizer(name)
    if "hf" in targets:
        hf_config(name)
    model = create_model(name, str(checkpoint)).eval()
    exporters = {"out": export_model, "onnx": export_onnx, "hf": export_hf}
    return {flag: exporters[flag](model, name, folder) for flag, folder in targets.items()}


def check_folder(folder: Path, flag: str, own_files: Collection[str] = ()) -> None:
    """A UserError unless `folder` is new, empty, or holds only `own_files` (what the export itself writes)."""
    others = sorted(p.name for p in folder.iterdir() if p.name not in own_files) if folder.is_dir() else []
    if others or (folder.exists() and not folder.is_dir()):
        raise UserError(f"--{flag} {folder}: must be a new or empty folder (it holds {others or 'a file'})")


@contextlib.contextmanager
def staged_folder(folder: Path, flag: str) -> Iterator[Path]:
    """A temporary folder beside `folder` to write into; it becomes `folder` when the block ends without error and
    is removed otherwise, so a failed export leaves nothing behind. `folder` must be new or empty."""
    check_folder(folder, flag)
    stage = folder.absolute().with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        stage.mkdir(parents=True)
        yield stage
        if folder.is_dir():
            folder.rmdir()  # empty (checked above): the stage takes its place
        os.replace(stage, folder)
    except OSError as error:
        raise UserError(f"--{flag} {folder}: cannot write ({error.strerror or error})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export_model(model: torch.nn.Module, name: str, out_dir: str | Path) -> Path:
    """Write `model` (architecture `name`) to `out_dir` as an open_clip local-dir model; returns the folder."""
    out_dir = Path(out_dir)
    check_folder(out_dir, "out", (CONFIG_FILE, WEIGHTS_FILE))
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


def with_openclip_vocabulary(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """`model` itself when its text tower reads open_clip's BPE ids; for a compact vocabulary, a copy whose token
    table is spread over the 49,408 BPE ids (each id takes the row the compact tokenizer maps it to)."""
    tokenizer = get_tokenizer(name)
    if not isinstance(tokenizer, CompactTokenizer):
        return model
    spread = copy.deepcopy(model)
    table = next(module for key, module in spread.named_modules() if key.endswith("token_embedding"))
    table.weight = torch.nn.Parameter(table.weight.detach()[tokenizer.lookup.to(table.weight.device)])
    table.num_embeddings = OPENCLIP_VOCAB_SIZE
    return spread


def bpe_tokenizer(name: str) -> SimpleTokenizer:
    """open_clip's BPE tokenizer, whose ids the exported text tower of `name` reads (see `with_openclip_vocabulary`);
    a UserError for a model with another tokenizer, which the exports cannot describe."""
    tokenizer = get_tokenizer(name)
    tokenizer = tokenizer.base if isinstance(tokenizer, CompactTokenizer) else tokenizer
    if type(tokenizer) is not SimpleTokenizer or tokenizer.clean_fn is not get_clean_fn("lower") \
            or tokenizer.reduction_fn or len(tokenizer.all_special_ids) != 2:
        raise UserError(f"{name}: its tokenizer ({type(tokenizer).__name__}) is not open_clip's default BPE "
                        "tokenizer, the only one the ONNX and transformers exports describe")
    return tokenizer


def eval_preprocess(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval preprocessing of `model` (its `preprocess_cfg`: what the exports' settings state)."""
    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


def describe_preprocess(model: torch.nn.Module) -> str:
    """`eval_preprocess` in words, for clients that rebuild it."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    resize = RESIZE_MODES.get(cfg["resize_mode"], cfg["resize_mode"]).format(size=size, fill=cfg["fill_color"])
    return (f"{cfg['mode']}, {resize} ({cfg['interpolation']}), pixels / 255, then (x - mean) / std per channel "
            f"with mean {list(cfg['mean'])} and std {list(cfg['std'])}")


def check_samples(count: int = 4, image_size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """Real inputs for the exports' parity checks: `count` toyworld validation images, their first captions and
    one caption outside the toy vocabulary (upper case, digits, punctuation)."""
    from clipkd_dino.toyworld.generate import render_sample

    samples = [render_sample(0, "val", index, image_size) for index in range(count)]
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png, _ in samples]
    return images, [meta["captions"][0] for _, meta in samples] + [OUTSIDE_TOY_VOCABULARY]
