"""TensorRT-LLM's word-list tensor format (``stop_words_list``, ``bad_words_list``).

One request's words are an INT32 array of shape ``[2, N]``: row 0 holds the token ids of all words one after
the other, row 1 the exclusive end offset of each word, padded with -1 to the same width N (the token count):
words ``[[5, 6], [9]]`` become ``[[5, 6, 9], [2, 3, -1]]``.
"""
from __future__ import annotations

import numbers

import numpy as np

from ragstack.contracts.errors import InvalidInput


def encode_word_list(words: list[list[int]]) -> np.ndarray:
    """``[[5, 6], [9]]`` -> ``[[5, 6, 9], [2, 3, -1]]`` (int32). No words gives a ``[2, 1]`` array of -1,
    since a zero-width tensor is awkward to send."""
    ids: list[int] = []
    offsets: list[int] = []
    for word in words:
        if len(word) == 0:
            raise InvalidInput("a word in a word list has no tokens")
        for token in word:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
                raise InvalidInput(f"word list token ids must be integers >= 0, got {token!r}")
            ids.append(int(token))
        offsets.append(len(ids))
    width = max(len(ids), 1)
    out = np.full((2, width), -1, dtype=np.int32)
    out[0, : len(ids)] = ids
    out[1, : len(offsets)] = offsets
    return out


def decode_word_list(array) -> list[list[int]]:
    """The words of one request's ``[2, N]`` array (a leading batch dimension of 1 is accepted)."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] != 2:
        raise InvalidInput(f"word list must have shape [2, N], got {list(np.shape(array))}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInput(f"word list must hold integers, got dtype {arr.dtype}")
    ids, offsets = arr[0].astype(np.int64), arr[1].astype(np.int64)
    padding = np.flatnonzero(offsets < 0)
    count = int(padding[0]) if len(padding) else len(offsets)
    if np.any(offsets[count:] != -1):
        raise InvalidInput("word list offsets must be followed only by -1 padding")
    offsets = offsets[:count]
    if count and (offsets[0] <= 0 or np.any(np.diff(offsets) <= 0)):
        raise InvalidInput(f"word list offsets must be strictly increasing and > 0, got {offsets.tolist()}")
    end = int(offsets[-1]) if count else 0
    if end > len(ids):
        raise InvalidInput(f"word list offset {end} is past the {len(ids)} token ids")
    if np.any(ids[:end] < 0):
        raise InvalidInput("word list token ids must be >= 0")
    if np.any(ids[end:] != -1):
        raise InvalidInput("word list has token ids after the last word's end offset")
    starts = np.concatenate([[0], offsets[:-1]]) if count else []
    return [ids[start:stop].tolist() for start, stop in zip(starts, offsets)]
