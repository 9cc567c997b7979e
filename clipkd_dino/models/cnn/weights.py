"""Load classifier weights: CRD / mdistiller teachers, torchvision / timm state dicts, from a local file or, for
`tv:NAME` and `timm:NAME` classifiers, by the library's own weights tag read from its download cache.

`resolve_classifier_weights(name, pretrained)` gives the file: `pretrained` itself when it is a file; for `tv:NAME` a
torchvision weights name (`IMAGENET1K_V1`, `DEFAULT`, or `ResNet34_Weights.IMAGENET1K_V1`), the file torchvision
keeps in `torch.hub.get_dir()/checkpoints`; for `timm:NAME` a timm pretrained tag (`a1_in1k`), the
`model.safetensors` of its Hugging Face repository in the HF cache. Nothing is downloaded when the file is cached;
with `HF_HUB_OFFLINE` set, a weights tag that is not cached is a one-line error saying what to do.

Accepted layouts: `{"model": state_dict, ...}` (CRD, mdistiller; the other entries are ignored),
`{"state_dict": state_dict, ...}`, a plain state dict, each optionally with DDP's "module." prefixes, and
`.safetensors` files. `.pth` files are read with `weights_only=True`; CRD's `*_last.pth` files also hold the
training options as an `argparse.Namespace`, which is allowed for that purpose.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torch import Tensor, nn

from clipkd_dino.errors import ConfigError, UserError
from clipkd_dino.files import read_torch_file
from clipkd_dino.models.cnn.imagenet import TimmClassifier, TorchvisionClassifier

WRAPPER_KEYS = ("model", "state_dict")
SHOWN_KEYS = 3


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict stored in `path`, unwrapped and without "module." prefixes; UserError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(path)
        except Exception as error:  # safetensors' errors: not a readable file
            raise UserError(f"cannot read classifier checkpoint {path}: {error}") from None
    else:  # CRD's checkpoints also hold their argparse options
        obj = read_torch_file(path, "classifier checkpoint", safe_globals=(argparse.Namespace,))
    while isinstance(obj, dict) and any(isinstance(obj.get(key), dict) for key in WRAPPER_KEYS):
        obj = next(obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), dict))
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"classifier checkpoint {path} holds no state dict (expected a dict of tensors, "
                        f"or one under 'model' or 'state_dict')")
    return {strip_module_prefix(key): value for key, value in obj.items()}


def resolve_classifier_weights(name: str, pretrained: str, download: bool = True) -> Path | None:
    """The local file of classifier `name`'s weights `pretrained` (see the module doc); None when it is a tag whose
    file is not cached and `download` is False while online (the loader will fetch it). ConfigError when neither a
    file nor a known tag, or not cached offline."""
    if Path(pretrained).is_file():
        return Path(pretrained)
    library, _, architecture = name.partition(":")
    if library.lower() == "tv":
        return _torchvision_weights(architecture, pretrained, download)
    if library.lower() == "timm":
        return _timm_weights(architecture, pretrained, download)
    raise ConfigError(f"classifier weights not found: {pretrained} (a file; weights tags work for tv:NAME and "
                      "timm:NAME classifiers)")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _not_cached(name: str, tag: str, where: str) -> ConfigError:
    return ConfigError(f"weights {tag!r} of {name!r} are not in the download cache ({where}) and HF_HUB_OFFLINE is "
                       "set: download them once with network, or pass the weights file")


def _torchvision_weights(architecture: str, tag: str, download: bool) -> Path | None:
    import torch
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(architecture.lower())
        weights = tvm.get_weight(tag) if "." in tag else enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        tags = ", ".join(member.name for member in tvm.get_model_weights(architecture.lower()))
        raise ConfigError(f"classifier weights not found: {tag} (nor is it a torchvision weights name of "
                          f"{architecture!r}: {tags})") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if file.is_file():
        return file
    if _offline():
        raise _not_cached(f"tv:{architecture}", tag, str(file))
    if not download:
        return None
    torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    return file


def _timm_weights(architecture: str, tag: str, download: bool) -> Path | None:
    import timm
    from huggingface_hub import hf_hub_download

    config = timm.models.get_pretrained_cfg(f"{architecture}.{tag}")
    if config is None or not config.hf_hub_id:
        raise ConfigError(f"classifier weights not found: {tag} (nor is it a timm pretrained tag of "
                          f"{architecture!r} on the Hugging Face hub: {', '.join(timm.list_pretrained(architecture))})")
    if not download and not _offline():
        return None
    try:
        return Path(hf_hub_download(config.hf_hub_id, "model.safetensors"))
    except Exception:  # huggingface_hub's offline and network errors alike: the file is not at hand
        if _offline():
            raise _not_cached(f"timm:{architecture}", tag, f"Hugging Face cache, {config.hf_hub_id}") from None
        raise


def strip_module_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def load_classifier_weights(model: nn.Module, path: str | Path) -> None:
    """Load `path` into `model` strictly (a torchvision / timm file into its wrapped `net`); UserError naming the
    file and the first missing, unexpected or mis-shaped keys when it does not fit."""
    state = read_state_dict(path)
    target = model
    if isinstance(model, (TimmClassifier, TorchvisionClassifier)) and not any(k.startswith("net.") for k in state):
        target = model.net
    expected = target.state_dict()
    problems = []
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatch (file vs model)", mismatched)):
        if keys:
            more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
            problems.append(f"{label}: {', '.join(keys[:SHOWN_KEYS])}{more}")
    if problems:
        raise UserError(f"classifier checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)}")
    target.load_state_dict(state, strict=True)
