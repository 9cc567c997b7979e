"""Tokenizers: open_clip's own, or a compact vocabulary over it for toy models.

A compact vocabulary keeps only the BPE ids that a closed caption grammar can produce (e.g. the toyworld data set),
remapped in increasing order so that the end-of-text token stays the largest id (open_clip pools the text tower at
the argmax of the token ids). Id 0 stays padding, id 1 stands for any BPE id outside the vocabulary.
Real models keep open_clip's tokenizer unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

VOCAB_DIR = Path(__file__).parent / "vocab"
PAD_ID, UNK_ID = 0, 1


def build_compact_vocabulary(words: Sequence[str]) -> list[int]:
    """Original BPE ids needed to encode `words`, as the compact table: position = compact id.

    Layout: [pad, unk, *sorted word ids, start-of-text, end-of-text].
    """
    base = SimpleTokenizer()
    word_ids = sorted({token for word in words for token in base.encode(word)})
    return [PAD_ID, UNK_ID, *word_ids, base.sot_token_id, base.eot_token_id]


class CompactTokenizer:
    """open_clip's BPE tokenizer followed by a lookup into a compact id table."""

    def __init__(self, token_ids: Sequence[int], context_length: int) -> None:
        self.base = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size = len(token_ids)
        lookup = torch.full((len(self.base.encoder),), UNK_ID, dtype=torch.long)
        lookup[torch.tensor(list(token_ids))] = torch.arange(len(token_ids))
        lookup[PAD_ID] = PAD_ID
        self.lookup = lookup

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids, shape [len(texts), context_length], in the compact vocabulary."""
        return self.lookup[self.base(texts, context_length or self.context_length)]


def load_vocabulary(name: str) -> list[int]:
    return json.loads((VOCAB_DIR / f"{name}.json").read_text())["token_ids"]


def shipped_vocabularies() -> dict[str, list[int]]:
    """Every compact vocabulary shipped with the package, by name."""
    return {path.stem: load_vocabulary(path.stem) for path in sorted(VOCAB_DIR.glob("*.json"))}
