"""The reference profile's embed and rerank engines: PyTorch on CPU behind the TensorRT plans' contract.

Like the plans, an engine takes ``input_ids`` and ``attention_mask`` (int32 ``[B, L]``, 1 = real token) as
numpy and returns numpy: float32 ``[B, dim]`` embeddings or float32 ``[B]`` scores. The tokenization that
produces those ids lives in :mod:`ragstack.text`. This module holds what both engines share: loading, checking
a token batch, and running a model to pooled hidden states (the bi-encoder reranker embeds exactly like the
embed engine does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ragstack.engine_spec import EngineSpec
from ragstack.errors import InvalidInput
from ragstack.text import read_spec


def load_engine_spec(engine_dir: Path, kind: str, num_threads: Optional[int]) -> EngineSpec:
    """The folder's spec, checked to be of ``kind``. ``num_threads`` sets torch's intra-op threads, which is
    process-wide: it matters when several Triton model instances share a CPU."""
    spec = read_spec(engine_dir, kind)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return spec


def check_token_batch(input_ids, attention_mask, vocab_size: int, max_length: int):
    """Refuse what the TensorRT plan would refuse or silently get wrong; returns int64 torch tensors.

    Out-of-vocabulary ids would index past the embedding table, a row with no real token has nothing to pool,
    and a longer L than max_length is past the plan's optimisation profile.
    """
    for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if not isinstance(array, np.ndarray) or array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise InvalidInput(f"{name} must be a 2-D integer (int32) array [batch, length], got "
                               f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}")
    if input_ids.shape != attention_mask.shape:
        raise InvalidInput(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} differ in shape")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise InvalidInput(f"empty token batch {input_ids.shape}")
    if length > max_length:
        raise InvalidInput(f"sequence length {length} exceeds the engine's max_length {max_length}")
    if not np.isin(attention_mask, (0, 1)).all():
        raise InvalidInput("attention_mask must hold only 0 and 1")
    empty_rows = np.flatnonzero(attention_mask.sum(axis=1) == 0)
    if empty_rows.size:
        raise InvalidInput(f"attention_mask rows {empty_rows.tolist()} have no real token")
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise InvalidInput(f"input_ids must lie in [0, {vocab_size}), got [{input_ids.min()}, {input_ids.max()}]")
    return torch.from_numpy(input_ids.astype(np.int64)), torch.from_numpy(attention_mask.astype(np.int64))


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the input embedding table: the real bound on ids (config and tokenizer sizes can differ)."""
    return model.get_input_embeddings().num_embeddings


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, whichever side the row is padded on."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(dims=[1]).argmax(dim=1)


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, L, H]`` of a base (headless) transformer.

    Positions count real tokens only, so a left-padded row gets the same positions (and, for absolute
    position embeddings like BERT's, the same result) as the row unpadded.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, L, H] -> [B, H]``: the last real token's state (Qwen3-Embedding) or the masked mean (BERT).

    The mean selects with ``where`` instead of multiplying by the mask: padded positions of a left-padded
    causal model attend to nothing and may hold NaN, and NaN * 0 is NaN.
    """
    if pooling == "last_token":
        return hidden[torch.arange(hidden.shape[0]), last_token_index(attention_mask)]
    real = attention_mask.unsqueeze(-1).bool()
    summed = torch.where(real, hidden, torch.zeros((), dtype=hidden.dtype)).sum(dim=1)
    return summed / attention_mask.sum(dim=1, keepdim=True).to(hidden.dtype)


def embed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
          dim: Optional[int] = None, normalize: bool = True) -> torch.Tensor:
    """Pooled embeddings ``[B, dim]``: Matryoshka truncation to ``dim`` comes before L2 normalisation, so the
    truncated vectors are unit length too."""
    pooled = pool(hidden_states(model, input_ids, attention_mask), attention_mask, pooling)
    if dim is not None:
        pooled = pooled[:, :dim]
    return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled


# Imported last: both modules import the helpers above from this package.
from ragstack.engines.embedding import EmbeddingEngine  # noqa: E402
from ragstack.engines.reranking import RerankEngine  # noqa: E402

__all__ = ["EmbeddingEngine", "RerankEngine"]
