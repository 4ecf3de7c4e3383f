"""Word-level tokenizer of the shapes world (HF `tokenizers`).

The vocabulary is [PAD] (id 0), [UNK] (id 1), then every word of every prompt template,
sorted. Texts are lower-cased, split on whitespace and padded with [PAD] to `MAX_LEN`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from leapalign_jax.toy import prompts

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
MAX_LEN = 12  # longest prompt ("a red square to the left of a blue circle") is 10 words


@functools.lru_cache(maxsize=None)
def vocabulary() -> tuple[str, ...]:
    words = sorted({w for p in prompts.all_prompts() for w in p.text.split()})
    return (PAD, UNK, *words)


def vocab_size() -> int:
    return len(vocabulary())


@functools.lru_cache(maxsize=None)
def tokenizer(max_len: int = MAX_LEN) -> Tokenizer:
    """The HF tokenizer, padding every text to `max_len` tokens."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([PAD])  # so decoding drops padding but shows [UNK]
    tok.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=max_len)
    return tok


def encode(texts: Sequence[str], max_len: int = MAX_LEN) -> np.ndarray:
    """int32 (B, max_len) token ids, [PAD]-padded. Raises if a text is too long."""
    if isinstance(texts, str):
        raise ValueError("encode takes a list of texts; wrap a single text in a list")
    encodings = tokenizer(max_len).encode_batch(list(texts))
    for text, enc in zip(texts, encodings):
        if len(enc.ids) > max_len:
            raise ValueError(f"{text!r} has {len(enc.ids)} words, more than max_len="
                             f"{max_len}; shorten it or raise max_len")
    return np.asarray([enc.ids for enc in encodings], np.int32).reshape(len(texts), max_len)


def mask(ids: np.ndarray) -> np.ndarray:
    """bool (B, S): True on real tokens, False on [PAD]."""
    return np.asarray(ids) != PAD_ID


def decode(ids: np.ndarray) -> list[str]:
    """Texts of (B, S) token ids, [PAD] dropped."""
    return tokenizer().decode_batch([list(map(int, row)) for row in np.asarray(ids)],
                                    skip_special_tokens=True)
