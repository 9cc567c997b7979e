"""Load classifier weights from a local file: CRD / mdistiller teachers, torchvision / timm state dicts.

Accepted layouts: `{"model": state_dict, ...}` (CRD, mdistiller; the other entries are ignored),
`{"state_dict": state_dict, ...}`, a plain state dict, each optionally with DDP's "module." prefixes, and
`.safetensors` files. `.pth` files are read with `weights_only=True`; CRD's `*_last.pth` files also hold the
training options as an `argparse.Namespace`, which is allowed for that purpose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor, nn

from clipkd_dino.errors import UserError
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
