"""Shipped model configs and the compact toy vocabulary."""

from __future__ import annotations

import json

import open_clip
import pytest

from clipkd_dino.toyworld.generate import vocabulary_words
from clipkd_dino.errors import ConfigError
from clipkd_dino.models import create_model, get_tokenizer, model_config
from clipkd_dino.models.factory import MODEL_CONFIG_DIR
from clipkd_dino.models.tokenizer import UNK_ID, build_compact_vocabulary, load_vocabulary


def test_shipped_toyworld_vocabulary_matches_the_grammar():
    assert load_vocabulary("toyworld") == build_compact_vocabulary(vocabulary_words())


@pytest.mark.parametrize("name", ["toy-teacher", "toy-student"])
def test_toy_configs_use_the_compact_vocabulary(name):
    assert model_config(name)["text_cfg"]["vocab_size"] == len(load_vocabulary("toyworld"))
    tokenizer = get_tokenizer(name)
    tokens = tokenizer(["two red stars above a blue fish", "a zebra"])
    eot = tokenizer.vocab_size - 1
    assert tokens.shape == (2, 32)
    assert tokens[0].max() == eot and tokens[0, 0] == eot - 1  # start-of-text, then words, then end-of-text
    assert (tokens[0] != UNK_ID).all() and UNK_ID in tokens[1].tolist()  # "zebra" is not a toyworld word


def test_vit_t16_matches_the_paper_architecture():
    config = json.loads((MODEL_CONFIG_DIR / "ViT-T-16.json").read_text())
    vision, text = config["vision_cfg"], config["text_cfg"]
    assert (config["embed_dim"], vision["width"], vision["layers"], vision["patch_size"]) == (512, 192, 12, 16)
    assert vision["width"] // vision["head_width"] == 3 and (text["width"], text["heads"], text["layers"]) == (384, 6, 12)
    assert get_tokenizer("ViT-T-16")(["a dog"]).shape == (1, 77)
    assert "ViT-T-16" in open_clip.list_models()


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model name 'ViT-Q-99'"):
        create_model("ViT-Q-99")
