"""Model factory: open_clip architectures plus the configs shipped in `model_configs/`.

Importing this module registers our configs with open_clip, so `open_clip.create_model_and_transforms(NAME,
pretrained=PATH)` works for them too. A model whose text vocabulary is smaller than open_clip's uses the shipped
compact vocabulary of that size (see `tokenizer.py`); all other models use open_clip's tokenizer.

`resolve` + `build` are the one way we make an open_clip model from a name and weights: a local file, an open_clip
tag (its file from the Hugging Face cache, where open_clip's own resolution finds it), or a `local-dir:` folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import open_clip
import torch
from huggingface_hub import is_offline_mode
from open_clip.factory import _find_checkpoint_in_dir
from PIL import Image
from torchvision import transforms as T

from clipkd_dino.errors import ConfigError
from clipkd_dino.files import load_error_reason, read_torch_file
from clipkd_dino.models.tokenizer import CompactTokenizer, shipped_vocabularies

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
OPENCLIP_VOCAB_SIZE = 49408
LOCAL_DIR_PREFIX = "local-dir:"
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's TorchScript state
open_clip.add_model_config(MODEL_CONFIG_DIR)

Tokenizer = Callable[[list[str]], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]
log = logging.getLogger(__name__)


def available_models() -> list[str]:
    return open_clip.list_models()


def architecture_name(name: str) -> str:
    """The name open_clip builds architecture `name` by: an open_clip model config file (`DIR/NAME.json`) is
    registered as NAME (refused in one line when open_clip knows another NAME); any other name as is (`local-dir:DIR`
    included: open_clip reads its folder)."""
    if not (name.endswith(".json") and not name.startswith(LOCAL_DIR_PREFIX)):
        return name
    file = Path(name)
    config = _read_json(file, name)
    if open_clip.get_model_config(file.stem) not in (None, config):
        raise ConfigError(f"{name}: open_clip already knows another architecture named {file.stem!r}: rename the file")
    return register_config(file.stem, config, name)


def register_config(name: str, config: dict, source: str) -> str:
    """Register architecture `config` with open_clip as `name`, or as `name-DIGEST` when open_clip knows another
    `name`; returns the name it is registered as."""
    if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"{source}: not an open_clip model config (it needs embed_dim, vision_cfg and text_cfg)")
    known = open_clip.get_model_config(name)
    if known == config:
        return name
    if known is not None:
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        return register_config(f"{name}-{digest}", config, source)
    folder = Path(tempfile.mkdtemp(prefix="clipkd-configs-"))
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return name


def _read_json(file: Path, what: str) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{what}: cannot read {file}: {load_error_reason(error)}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: {file} is not a JSON object")
    return value


def model_config(name: str) -> dict:
    """The architecture config of `name` (as `architecture_name` takes it); ConfigError when open_clip does not know
    it."""
    config = open_clip.get_model_config(architecture_name(name))
    if config is None:
        raise ConfigError(
            f"unknown model name {name!r}: use an open_clip architecture or a config in {MODEL_CONFIG_DIR} "
            f"(e.g. {', '.join(sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json')))})"
        )
    return config


def check_pretrained(path: str | None) -> None:
    if path and not Path(path).is_file():
        raise ConfigError(f"pretrained checkpoint not found: {path}")


@dataclass(frozen=True)
class Resolved:
    """What a name and its weights load as: `name`, the architecture to build; `pretrained`, what open_clip gets (a
    file or a tag; None for a `local-dir:` folder or no weights); `weights_file`, the local file the weights are read
    from (None: no weights, or a tag whose file is not looked up yet, see `resolve`)."""

    name: str
    pretrained: str | None
    weights_file: Path | None


def resolve(name: str, pretrained: str | None = None, download: bool = True) -> Resolved:
    """Check `name` + `pretrained` and find the weights' file without loading them; a one-line ConfigError otherwise.

    `name`: an open_clip architecture (`-quickgelu` ones included), a shipped config, or `local-dir:DIR` (no
    `pretrained`). `pretrained`: None, an open_clip tag of `name` or a local file (open_clip's order). A tag's file
    comes from open_clip's own resolution (`open_clip.pretrained.download_pretrained`): from the Hugging Face cache
    when HF_HUB_OFFLINE is set, else downloaded, or left unresolved (`weights_file` None) when not `download`. A tag
    trained with QuickGELU under a GELU architecture builds `NAME-quickgelu` (open_clip 3 would build GELU and warn).
    """
    if name.startswith(LOCAL_DIR_PREFIX):
        return _resolve_local_dir(name, pretrained)
    name = architecture_name(name)
    config = model_config(name)
    if not pretrained:
        return Resolved(name, None, None)
    tag = open_clip.get_pretrained_cfg(name, pretrained)
    if tag:
        file = _tag_file(name, pretrained, tag) if download or is_offline_mode() else None
        return Resolved(_tag_architecture(name, pretrained, config, tag), pretrained, file)
    if Path(pretrained).is_file():
        return Resolved(name, pretrained, Path(pretrained).absolute())
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ConfigError(f"pretrained checkpoint not found: {pretrained} (nor is it an open_clip tag of {name!r}: "
                      f"{', '.join(tags) or 'it has none'})")


def model_folder(name: str, prefix: str, marker: str, what: str, pretrained: str | None) -> Path:
    """The folder of a `PREFIX:DIR` model name: it holds its own weights (no `pretrained`) and a `marker` file."""
    folder = Path(name[len(prefix):])
    if pretrained:
        raise ConfigError(f"{name} holds its own weights: give no pretrained (got {pretrained!r})")
    if not (folder / marker).is_file():
        raise ConfigError(f"{name}: not {what} ({folder / marker} not found)")
    return folder


def _resolve_local_dir(name: str, pretrained: str | None) -> Resolved:
    folder = model_folder(name, LOCAL_DIR_PREFIX, "open_clip_config.json", "an open_clip model folder", pretrained)
    file = _find_checkpoint_in_dir(folder)  # the file open_clip itself loads from the folder
    if file is None:
        raise ConfigError(f"{name}: no weights file in {folder} (*.safetensors, *.bin or *.pth)")
    return Resolved(name, None, Path(file).absolute())


def _tag_file(name: str, tag: str, tag_config: dict) -> Path:
    """The local file of an open_clip tag, found (or downloaded) exactly as open_clip.create_model finds it."""
    try:
        return Path(open_clip.pretrained.download_pretrained(tag_config))
    except (OSError, RuntimeError, ValueError) as error:
        source = tag_config.get("hf_hub") or tag_config.get("url")
        if is_offline_mode():
            raise ConfigError(f"weights of {name!r} pretrained={tag!r} ({source}) are not in the Hugging Face cache "
                              "and HF_HUB_OFFLINE is set: download them once with network (open_clip.create_model("
                              f"{name!r}, pretrained={tag!r})) or pass the weights file") from None
        raise ConfigError(f"cannot download the weights of {name!r} pretrained={tag!r} ({source}): "
                          f"{load_error_reason(error)}") from None


def _tag_architecture(name: str, tag: str, config: dict, tag_config: dict) -> str:
    if not tag_config.get("quick_gelu") or config.get("quick_gelu"):
        return name
    quick = f"{name}-quickgelu"  # open_clip registers QuickGELU tags under this name too
    if open_clip.get_model_config(quick) is None or not open_clip.get_pretrained_cfg(quick, tag):
        raise ConfigError(f"pretrained={tag!r} of {name!r} was trained with QuickGELU and open_clip has no {quick!r} "
                          "with this tag")
    log.info("%s pretrained=%r was trained with QuickGELU: building %s", name, tag, quick)
    return quick


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive (how OpenAI distributes CLIP): a zip with a top-level constants.pkl,
    torch's own sign (a torch.save file is a zip without it)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(member.split("/", 1)[-1] == "constants.pkl" for member in archive.namelist())


@contextlib.contextmanager
def _loading(name: str, pretrained: str | Path | None) -> Iterator[None]:
    """Turn open_clip's loading errors into one-line ConfigErrors naming the model and the file."""
    try:
        yield
    # weights not cached offline, a foreign state dict, a pickle torch.load(weights_only=True) refuses, ...
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as error:
        lines = str(error).strip().splitlines()
        reason = f"{lines[0]} {lines[1].strip()}"[:300] if len(lines) > 1 and lines[0].endswith(":") \
            else load_error_reason(error)  # "Error(s) in loading state_dict for CLIP:" then the keys
        raise ConfigError(f"cannot load {name!r} with pretrained={str(pretrained)!r}: {reason}") from None


def build(resolved: Resolved, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Transform]:
    """(model in fp32 on `device`, its eval preprocessing) as `resolved` says, through open_clip."""
    if resolved.pretrained and resolved.weights_file and is_torchscript_archive(resolved.weights_file):
        return _build_from_torchscript(resolved.name, resolved.weights_file, device)
    with _loading(resolved.name, resolved.pretrained):
        model, _, transform = open_clip.create_model_and_transforms(resolved.name, pretrained=resolved.pretrained,
                                                                    device=device)
    return model, transform


def _build_from_torchscript(name: str, file: Path, device: str | torch.device) -> tuple[torch.nn.Module, Transform]:
    """OpenAI's release format, which torch.load(weights_only=True) refuses: read with torch.jit.load (TorchScript's
    own loader, no Python unpickling); its state dict (OpenAI's layout is open_clip's) loaded strictly into `name`."""
    if not model_config(name).get("quick_gelu"):
        log.warning("%s looks like OpenAI's release (a TorchScript archive) but %r uses GELU: OpenAI's weights need "
                    "QuickGELU, the activation is probably wrong: use %r", file, name, f"{name}-quickgelu")
    with _loading(name, file):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit
            archive = torch.jit.load(str(file), map_location="cpu")
        state = {key: value for key, value in archive.state_dict().items() if key not in OPENAI_METADATA_KEYS}
        with _no_random_init_warning():
            model, _, transform = open_clip.create_model_and_transforms(name)
        model.load_state_dict(state)
    return model.to(device), transform


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning (on the root logger) for a model whose weights follow."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    logging.root.addFilter(keep)
    try:
        yield
    finally:
        logging.root.removeFilter(keep)


def create_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An open_clip CLIP model in fp32 on `device`; `name` and `pretrained` (a local file, an open_clip tag or
    None) as in `resolve`."""
    resolved = resolve(name, pretrained)
    if resolved.name != architecture_name(name):
        log.warning("%s pretrained=%r builds %s (its weights were trained with QuickGELU): name the model %s so "
                    "that its checkpoints load right", name, pretrained, resolved.name, resolved.name)
    return build(resolved, device)[0]


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer that matches the text tower of model `name`."""
    name = architecture_name(name)
    text_cfg = model_config(name)["text_cfg"]
    vocab_size = text_cfg.get("vocab_size", OPENCLIP_VOCAB_SIZE)
    if vocab_size == OPENCLIP_VOCAB_SIZE or "hf_tokenizer_name" in text_cfg:
        return open_clip.get_tokenizer(name)
    for token_ids in shipped_vocabularies().values():
        if len(token_ids) == vocab_size:
            return CompactTokenizer(token_ids, context_length=text_cfg.get("context_length", 77))
    raise ConfigError(f"model {name!r} has a text vocabulary of {vocab_size} tokens and no shipped vocabulary fits")


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def image_normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's input normalisation (OpenAI's when the model does not say)."""
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return tuple(mean), tuple(std)


def image_transforms(model: torch.nn.Module, augment: bool = True, crop_scale: tuple[float, float] = (0.9, 1.0)):
    """(train, eval) transforms for the model's input size.

    Train: RandomResizedCrop(scale=crop_scale) when `augment`, else resize + centre crop; RGB uint8 [3, H, W] pixels
    (a quarter of float32's bytes through the loader's shared memory), normalised on the device by the objective
    (`PixelNormaliser`). Eval: resize the short side, centre crop, RGB, normalised float with the model's mean/std.
    """
    size = image_size(model)
    mean, std = image_normalisation(model)
    bicubic = T.InterpolationMode.BICUBIC
    centre = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size), T.Lambda(_to_rgb)]
    eval_tf = T.Compose([*centre, T.ToTensor(), T.Normalize(mean, std)])
    crop = [T.RandomResizedCrop(size, scale=crop_scale, interpolation=bicubic), T.Lambda(_to_rgb)]
    return T.Compose([*(crop if augment else centre), T.PILToTensor()]), eval_tf


class PixelNormaliser(torch.nn.Module):
    """uint8 pixels [B, 3, H, W] -> the model's normalised float input, on the pixels' device; float input (already
    normalised) passes through."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        mean, std = image_normalisation(model)
        self.register_buffer("mean", 255 * torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.mean) / self.std if pixels.dtype == torch.uint8 else pixels


def _to_rgb(image):
    return image.convert("RGB")


def checkpoint_model_name(path: str | Path) -> str:
    """The architecture name stored in a clipkd training checkpoint (`model_name`)."""
    check_pretrained(str(path))
    checkpoint = read_torch_file(path, mmap=True)
    name = checkpoint.get("model_name") if isinstance(checkpoint, dict) else None
    if not isinstance(name, str):
        raise ConfigError(f"{path} does not name its architecture (no 'model_name'): give the model name too")
    config = checkpoint.get("model_config")
    if isinstance(config, dict) and (name.startswith(LOCAL_DIR_PREFIX) or open_clip.get_model_config(name) != config):
        # trained from a config file or a local-dir: folder, or under a name that now means another architecture
        base = Path(name[len(LOCAL_DIR_PREFIX):] if name.startswith(LOCAL_DIR_PREFIX) else name)
        return register_config(base.stem if base.suffix == ".json" else base.name, config, str(path))
    return name
