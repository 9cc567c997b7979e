"""Export an open_clip ViT CLIP as a transformers `CLIPModel` folder: `CLIPModel.from_pretrained(DIR)` and
`CLIPProcessor.from_pretrained(DIR)` load it offline and give open_clip's features.

Only what transformers' CLIP can hold maps: a plain ViT image tower pooled at its class token, open_clip's default
text transformer pooled at the end-of-text token, linear projections without bias, GELU or QuickGELU, LayerNorms
that differ at most in eps. Any other setting (a timm or ModifiedResNet tower, attentional pooling, a SigLIP bias,
...) is refused in one line naming it, before any weights are read. The tokenizer files come from open_clip's own
BPE tokenizer (the same 49,408 ids: `<|startoftext|>` 49406, `<|endoftext|>` 49407, at which the text tower pools,
as open_clip's argmax); the image processor from the model's preprocessing. transformers is imported only to
export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer

from clipkd_dino.errors import UserError
from clipkd_dino.export.common import (
    bpe_tokenizer,
    check_samples,
    describe_preprocess,
    eval_preprocess,
    staged_folder,
    with_openclip_vocabulary,
)
from clipkd_dino.models.factory import OPENCLIP_VOCAB_SIZE, model_config
from clipkd_dino.models.loading import HF_PREFIX, load_clip

MAPPED = {"": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"},
          "vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "norm_kwargs",
                         "patch_dropout", "output_tokens"},
          "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs",
                       "output_tokens"}}
DEFAULTS = {"": {"custom_text": False, "nonscalar_logit_scale": False},
            "vision_cfg": {f.name: f.default for f in dataclasses.fields(CLIPVisionCfg)},
            "text_cfg": {f.name: f.default for f in dataclasses.fields(CLIPTextCfg)}}
WHY = {
    "vision_cfg.timm_model_name": "a timm image tower",
    "vision_cfg.layers": "a ModifiedResNet image tower",
    "vision_cfg.attentional_pool": "attentional pooling",
    "vision_cfg.pool_type": "image pooling other than the class token",
    "vision_cfg.ls_init_value": "layer scale",
    "vision_cfg.no_ln_pre": "an image tower without its first LayerNorm",
    "text_cfg.hf_model_name": "a Hugging Face text tower",
    "text_cfg.pool_type": "text pooling other than at the end-of-text token",
    "text_cfg.ls_init_value": "layer scale",
    "text_cfg.proj_bias": "a text projection with a bias",
    "custom_text": "a text tower of its own class (CustomTextCLIP)",
    "init_logit_bias": "a SigLIP logit bias",
    "multimodal_cfg": "a CoCa text decoder",
}
SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's codes, what CLIPImageProcessor takes
MAX_DIFF = 1e-4
README = """# {name}, exported by clipkd export for transformers

```python
from transformers import CLIPModel, CLIPProcessor
model = CLIPModel.from_pretrained("{folder}")
processor = CLIPProcessor.from_pretrained("{folder}")
inputs = processor(text=["a photo of a cat"], images=image, return_tensors="pt", padding="max_length")
image_features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
text_features = model.get_text_features(input_ids=inputs["input_ids"],
                                        attention_mask=inputs["attention_mask"]).pooler_output
```

The tokenizer is OpenAI CLIP's byte-level BPE, the ids of open_clip's `SimpleTokenizer` (open_clip pads with 0,
this one with `<|endoftext|>`: the text tower pools at the first end-of-text token, so both give the same
features). The image processor: {preprocess}.

Checked at export against the open_clip model on drawn test images and captions (fp32): {check}.
"""


def hf_config(name: str) -> dict[str, Any]:
    """transformers `CLIPConfig` keyword arguments for open_clip architecture `name`; a UserError naming the first
    setting transformers' CLIPModel cannot hold."""
    config = model_config(name)
    unmapped = next(_unmapped(config), None)
    if unmapped:
        key, value = unmapped
        why = f"{WHY[key]}, which CLIPModel cannot hold" if key in WHY else "CLIPModel has no such setting"
        raise UserError(f"{name} cannot be exported as a transformers CLIPModel: {key}={value!r} ({why})")
    bpe_tokenizer(name)
    vision = {**DEFAULTS["vision_cfg"], **config["vision_cfg"]}
    text = {**DEFAULTS["text_cfg"], **config["text_cfg"]}
    shared = {"hidden_act": "quick_gelu" if config.get("quick_gelu") else "gelu",
              "projection_dim": config["embed_dim"]}
    return {
        "projection_dim": config["embed_dim"],
        "vision_config": {**shared, "hidden_size": vision["width"], "num_hidden_layers": vision["layers"],
                          "intermediate_size": int(vision["width"] * vision["mlp_ratio"]),
                          "num_attention_heads": vision["width"] // vision["head_width"],
                          "image_size": _side(vision["image_size"]), "patch_size": _side(vision["patch_size"]),
                          "layer_norm_eps": _eps(vision)},
        "text_config": {**shared, "hidden_size": text["width"], "num_hidden_layers": text["layers"],
                        "intermediate_size": int(text["width"] * text["mlp_ratio"]),
                        "num_attention_heads": text["heads"], "max_position_embeddings": text["context_length"],
                        "vocab_size": OPENCLIP_VOCAB_SIZE, "layer_norm_eps": _eps(text),
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
    }


def _unmapped(config: dict) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of each setting of an open_clip config that CLIPModel cannot hold."""
    for section in ("vision_cfg", "text_cfg", ""):
        settings = config[section] if section else config
        for key, value in settings.items():
            if key not in MAPPED[section] and value != DEFAULTS[section].get(key):
                yield f"{section}.{key}".lstrip("."), value
        if set(settings.get("norm_kwargs") or {}) - {"eps"}:
            yield f"{section}.norm_kwargs", settings["norm_kwargs"]
    vision = config["vision_cfg"]
    if not isinstance(vision.get("layers", 12), int):
        yield "vision_cfg.layers", vision["layers"]
    for key in ("image_size", "patch_size"):
        if _side(vision.get(key, 0)) is None:
            yield f"vision_cfg.{key}", vision[key]


def _side(size: int | list[int]) -> int | None:
    """The side of a square size (an int or an [h, w] pair of equal sides); None when not square."""
    sides = set(size) if isinstance(size, (list, tuple)) else {size}
    return sides.pop() if len(sides) == 1 else None


def _eps(tower: dict) -> float:
    return (tower.get("norm_kwargs") or {}).get("eps", 1e-5)  # open_clip's LayerNorm: torch's default eps


def hf_state_dict(model: torch.nn.Module, layers: tuple[int, int]) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights (open_clip vocabulary, see `with_openclip_vocabulary`) under CLIPModel's names;
    `layers`: the (vision, text) block counts. q, k, v come out of the fused in-projection; projections are
    stored transposed (nn.Linear without bias)."""
    ours = {key: tensor.detach().cpu() for key, tensor in model.state_dict().items()}
    theirs = {
        "vision_model.embeddings.class_embedding": ours["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": ours["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": ours["visual.positional_embedding"],
        "visual_projection.weight": ours["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": ours["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": ours["positional_embedding"],
        "text_projection.weight": ours["text_projection"].T,
        "logit_scale": ours["logit_scale"],
    }
    for source, target in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                           ("visual.ln_post", "vision_model.post_layernorm"),
                           ("ln_final", "text_model.final_layer_norm")):
        theirs.update(_renamed(ours, source, target))
    for (source, target), count in zip((("visual.transformer", "vision_model.encoder"),
                                        ("transformer", "text_model.encoder")), layers):
        for index in range(count):
            theirs.update(_block(ours, f"{source}.resblocks.{index}", f"{target}.layers.{index}"))
    return {key: tensor.contiguous() for key, tensor in theirs.items()}


def _renamed(ours: dict[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    return {f"{target}.{kind}": ours[f"{source}.{kind}"] for kind in ("weight", "bias")}


def _block(ours: dict[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    """One residual attention block: nn.MultiheadAttention's fused q, k, v split into CLIPAttention's three."""
    block = {}
    for kind in ("weight", "bias"):
        for letter, part in zip("qkv", ours[f"{source}.attn.in_proj_{kind}"].chunk(3)):
            block[f"{target}.self_attn.{letter}_proj.{kind}"] = part
    for ours_name, their_name in (("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"),
                                  ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        block.update(_renamed(ours, f"{source}.{ours_name}", f"{target}.{their_name}"))
    return block


def clip_tokenizer(bpe: SimpleTokenizer, context_length: int):
    """transformers' CLIPTokenizer with open_clip's BPE vocabulary and merges (built offline, same ids)."""
    from transformers import CLIPTokenizer

    vocab = {SPECIAL_TOKENS.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def image_processor(model: torch.nn.Module):
    """transformers' CLIPImageProcessor doing `model`'s eval preprocessing; a UserError for a resize it lacks."""
    from transformers import CLIPImageProcessor

    preprocess = model.visual.preprocess_cfg
    side = _side(preprocess["size"])
    if preprocess["resize_mode"] not in ("shortest", "squash") or preprocess["interpolation"] not in RESAMPLE:
        raise UserError(f"preprocessing resize_mode={preprocess['resize_mode']!r}, interpolation="
                        f"{preprocess['interpolation']!r}: CLIPImageProcessor has no such setting")
    shortest = preprocess["resize_mode"] == "shortest"
    return CLIPImageProcessor(
        size={"shortest_edge": side} if shortest else {"height": side, "width": side},
        crop_size={"height": side, "width": side}, do_center_crop=shortest,
        resample=RESAMPLE[preprocess["interpolation"]],
        image_mean=list(preprocess["mean"]), image_std=list(preprocess["std"]))


def export_hf(model: torch.nn.Module, name: str, out_dir: str | Path) -> Path:
    """Write `model` (architecture `name`) to `out_dir` (new or empty) as a transformers CLIPModel with its
    tokenizer and image processor, checked against open_clip: a UserError when a feature differs by more than
    1e-4 (times the largest feature magnitude when above 1)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    out_dir = Path(out_dir)
    config = CLIPConfig(**hf_config(name))
    model = with_openclip_vocabulary(model, name).eval()
    processor = CLIPProcessor(image_processor=image_processor(model),
                              tokenizer=clip_tokenizer(bpe_tokenizer(name), model.context_length))
    with torch.device("meta"):
        exported = CLIPModel(config)  # no initialisation: every weight comes from the model
    layers = (config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers)
    exported.load_state_dict(hf_state_dict(model, layers), strict=True, assign=True)
    with staged_folder(out_dir, "hf") as stage, _quiet():
        exported.save_pretrained(stage)
        processor.save_pretrained(stage)
        check = _check(model, name, stage)
        (stage / "README.md").write_text(README.format(name=name, folder=out_dir.name, check=json.dumps(check),
                                                       preprocess=describe_preprocess(model)))
    return out_dir


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars (saving and loading weights) while the block runs."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _check(model: torch.nn.Module, name: str, folder: Path) -> dict[str, float]:
    """Features of the saved folder, loaded as `hf:` (its tokenizer too), against open_clip's on real inputs: the
    max abs differences; a UserError above the tolerance."""
    exported = load_clip(f"{HF_PREFIX}{folder}")
    images, texts = check_samples()
    pixels = torch.stack([eval_preprocess(model)(image) for image in images])
    device = next(model.parameters()).device
    with torch.no_grad():
        pairs = {"image": (model.encode_image(pixels.to(device)), exported.model.encode_image(pixels)),
                 "text": (model.encode_text(bpe_tokenizer(name)(texts).to(device)),
                          exported.model.encode_text(exported.tokenizer(texts)))}
    check = {}
    for tower, (ours, theirs) in pairs.items():
        diff, tolerance = float((ours.cpu() - theirs).abs().max()), MAX_DIFF * max(1.0, float(ours.abs().max()))
        if diff > tolerance:
            raise UserError(f"transformers' {tower} features differ from open_clip's by {diff:.2e} (> "
                            f"{tolerance:.1e}): not written")
        check[f"max_abs_diff_{tower}"] = diff
    return check
