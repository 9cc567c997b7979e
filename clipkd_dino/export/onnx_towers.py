"""Export a CLIP model's image and text towers as ONNX files, checked in onnxruntime against torch.

The folder holds `image.onnx` (float32 normalised pixels [batch, 3, S, S] -> image features), `text.onnx` (int64
open_clip BPE ids [batch, context length] -> text features), open_clip's BPE vocabulary file, and `clip_onnx.json`:
the towers' inputs and outputs, the preprocessing (size, resize and crop, interpolation, mean, std), the tokenizer
settings and the parity check (the lowest cosine of onnxruntime's features to torch's on the drawn images and the
captions of `common.check_samples`, at batch 1 and at the whole check batch). Features are not L2-normalised, as
open_clip's `encode_*`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from clipkd_dino.errors import UserError
from clipkd_dino.export.common import (
    bpe_tokenizer,
    check_samples,
    describe_preprocess,
    eval_preprocess,
    staged_folder,
    with_openclip_vocabulary,
)
from clipkd_dino.models.factory import OPENCLIP_VOCAB_SIZE, get_tokenizer, image_size, model_config
from clipkd_dino.models.tokenizer import CompactTokenizer

SETTINGS_FILE = "clip_onnx.json"
MIN_COSINE = 0.9999


@dataclasses.dataclass(frozen=True)
class Tower:
    """One exported tower: its file, input and output names, and the open_clip method it runs."""

    file: str
    input: str
    output: str
    method: str


IMAGE = Tower("image.onnx", "pixels", "image_features", "encode_image")
TEXT = Tower("text.onnx", "input_ids", "text_features", "encode_text")


class _Encoder(torch.nn.Module):
    """`model.<method>(inputs)` as a module of its own, what torch.onnx exports."""

    def __init__(self, model: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(inputs)


def export_onnx(model: torch.nn.Module, name: str, out_dir: str | Path) -> Path:
    """Write `model`'s towers (architecture `name`) as ONNX to `out_dir` (new or empty) with their settings;
    a UserError, and nothing written, when onnxruntime's features fall below cosine 0.9999 to torch's."""
    out_dir = Path(out_dir)
    tokenizer = bpe_tokenizer(name)
    model = with_openclip_vocabulary(model, name).eval()
    device = next(model.parameters()).device
    images, texts = check_samples()
    examples = {IMAGE: torch.stack([eval_preprocess(model)(image) for image in images]), TEXT: tokenizer(texts)}
    with staged_folder(out_dir, "onnx") as stage:
        check = {tower.file: _export_tower(model, tower, example.to(device), stage)
                 for tower, example in examples.items()}
        shutil.copyfile(default_bpe(), stage / Path(default_bpe()).name)
        settings = {"architecture": name, **_settings(model, name, tokenizer), "check": check}
        (stage / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir


def _export_tower(model: torch.nn.Module, tower: Tower, example: torch.Tensor, folder: Path) -> dict:
    """Export one tower with a dynamic batch axis; onnxruntime against torch at batch 1 and the whole batch."""
    encoder = _Encoder(model, tower.method).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's notes on the exporter and opsets
        torch.onnx.export(encoder, (example,), folder / tower.file, input_names=[tower.input],
                          output_names=[tower.output], dynamic_shapes={"inputs": {0: torch.export.Dim("batch")}},
                          dynamo=True, external_data=False, verbose=False)
        expected = encoder(example).cpu().numpy()
    session = onnx_session(folder / tower.file)
    inputs = example.cpu().numpy()
    cosines = {f"batch_{size}": float(_cosine(session.run(None, {tower.input: inputs[:size]})[0],
                                              expected[:size]).min())
               for size in (1, len(inputs))}
    if min(cosines.values()) < MIN_COSINE:
        raise UserError(f"{tower.file}: onnxruntime's {tower.output} differ from torch's (cosine "
                        f"{min(cosines.values()):.6f} < {MIN_COSINE}): nothing written")
    return {"inputs": len(inputs), "min_cosine": cosines}


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of `path` (`threads` intra-op threads; onnxruntime's default when None)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _settings(model: torch.nn.Module, name: str, tokenizer: SimpleTokenizer) -> dict:
    """What a client needs around the two files: inputs and outputs, preprocessing, tokenizer."""
    preprocess = model.visual.preprocess_cfg
    size, length, dim = image_size(model), model.context_length, model_config(name)["embed_dim"]
    tokenizer_settings = {
        "name": "open_clip SimpleTokenizer: OpenAI CLIP's byte-level BPE after ftfy fix, HTML unescape, "
                "whitespace clean, lower case",
        "bpe_vocabulary": Path(default_bpe()).name,
        "python": f"open_clip.tokenizer.SimpleTokenizer(context_length={length})",
        "context_length": length, "vocab_size": OPENCLIP_VOCAB_SIZE,
        "start_of_text_id": tokenizer.sot_token_id, "end_of_text_id": tokenizer.eot_token_id, "pad_id": 0,
        "layout": "[start_of_text, BPE ids..., end_of_text, 0, ...]; a longer text is cut, its last id end_of_text",
    }
    compact = get_tokenizer(name)
    if isinstance(compact, CompactTokenizer):
        tokenizer_settings["note"] = (
            f"{name} was trained on a compact vocabulary of {compact.vocab_size} ids over open_clip's BPE; the export "
            "spread its token table over all 49,408 BPE ids (ids outside it take its unknown-token row): feed plain "
            "open_clip BPE ids")
    return {
        "image": {"file": IMAGE.file, "input": {"name": IMAGE.input, "dtype": "float32",
                                                "shape": ["batch", 3, size, size]},
                  "output": {"name": IMAGE.output, "dtype": "float32", "shape": ["batch", dim]},
                  "preprocess": {"image_size": size, "mode": preprocess["mode"],
                                 "resize_mode": preprocess["resize_mode"], "interpolation": preprocess["interpolation"],
                                 "fill_color": preprocess["fill_color"], "mean": list(preprocess["mean"]),
                                 "std": list(preprocess["std"]), "steps": describe_preprocess(model)}},
        "text": {"file": TEXT.file, "input": {"name": TEXT.input, "dtype": "int64", "shape": ["batch", length]},
                 "output": {"name": TEXT.output, "dtype": "float32", "shape": ["batch", dim]},
                 "tokenizer": tokenizer_settings},
        "features": "not L2-normalised (as open_clip's encode_image / encode_text): normalise both, then "
                    f"logits = logit_scale * image @ text.T with logit_scale {model.logit_scale.exp().item():.4f}",
    }
