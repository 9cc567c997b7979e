"""What every export target shares: output folders written whole or not at all, the token table spread over
open_clip's BPE ids, the eval preprocessing (as a transform and in words) and the inputs of the parity checks.

A model with a compact vocabulary (toy models) gets its token table spread over open_clip's 49,408 BPE ids, each id
taking the row the compact tokenizer maps it to, so open_clip's own tokenizer gives the same text features; every
target gets this spread table, so every client feeds plain open_clip BPE ids.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Collection, Iterator

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw

from clipkd_dino.errors import UserError
from clipkd_dino.models.factory import OPENCLIP_VOCAB_SIZE, get_tokenizer
from clipkd_dino.models.tokenizer import CompactTokenizer

RESIZE_MODES = {  # open_clip's eval resize modes
    "shortest": "resize the short side to {size} px, centre crop {size} x {size}",
    "longest": "resize the long side to {size} px, pad to {size} x {size} with {fill}",
    "squash": "resize to {size} x {size} (aspect ratio not kept)",
}
CHECK_CAPTIONS = (  # toyworld-like captions, then one outside the toy vocabulary (upper case, digits, punctuation)
    "a purple ladder next to a purple ladder",
    "there is one small pink moon on the right",
    "a drawing of one purple key on a light green background",
    "a photo of a small orange tree over a circle",
    "A photo of an old bicycle leaning on a wall, next to 3 dogs!",
)
CHECK_COLOURS = ("purple", "pink", "orange", "teal", "gold", "navy")


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
    """The inputs of the exports' parity checks: `count` drawn images and `CHECK_CAPTIONS`."""
    return [check_image(index, image_size) for index in range(count)], list(CHECK_CAPTIONS)


def check_image(index: int, size: int) -> Image.Image:
    """Test image `index`: a colour ramp with a disc and a square whose colours and places depend on `index`."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(40 * index % 256)), axis=-1)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    step = size // 8
    x, y = (index * 3 % 5) * step, (index * 2 % 5) * step
    draw.ellipse((x, y, x + 3 * step, y + 3 * step), fill=CHECK_COLOURS[index % len(CHECK_COLOURS)])
    draw.rectangle((size - x - 2 * step, size - y - 2 * step, size - x, size - y),
                   fill=CHECK_COLOURS[(index + 2) % len(CHECK_COLOURS)])
    return image
