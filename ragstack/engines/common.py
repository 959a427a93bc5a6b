"""What the reference embed and rerank engines share: loading, placing a model, checking a token batch, and running
a model to pooled hidden states (the bi-encoder reranker embeds exactly like the embed engine does).

``device`` and ``dtype`` put the model, and every tensor these helpers create, on another device or in a lower
precision (bfloat16 on a GPU); inputs and outputs stay numpy on the host either way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ragstack.governance.engine_spec import EngineSpec
from ragstack.contracts.errors import InvalidInput
from ragstack.tokenization.retrieval import read_spec


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """A torch dtype from a dtype or its name ("float32", "bfloat16", "float16"; "torch." prefix allowed);
    None means float32, the reference profile's default."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """A torch device ("cpu" when None); "cuda" without an index becomes the current CUDA device."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def place_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in eval mode, on ``device`` in ``dtype`` (a no-op for a float32 CPU model on CPU).

    A model already in ``dtype`` (loaded with ``dtype=``) is only moved: casting it again would also cast the
    float32 buffers transformers keeps on purpose, such as the rotary embedding's inverse frequencies.
    """
    model = model.to(device=device)
    if getattr(model, "dtype", None) != dtype:
        model = model.to(dtype=dtype)
    return model.eval()


def load_engine_spec(engine_dir: Path, kind: str, num_threads: Optional[int]) -> EngineSpec:
    """The folder's spec, checked to be of ``kind``. ``num_threads`` sets torch's intra-op threads, which is
    process-wide: it matters when several Triton model instances share a CPU."""
    spec = read_spec(engine_dir, kind)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return spec


def check_token_batch(input_ids, attention_mask, vocab_size: int, max_length: int,
                      device: Optional[torch.device] = None):
    """Refuse what the TensorRT plan would refuse or silently get wrong; returns int64 torch tensors (on
    ``device`` when given, else on CPU).

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
    ids, mask = torch.from_numpy(input_ids.astype(np.int64)), torch.from_numpy(attention_mask.astype(np.int64))
    if device is not None and torch.device(device).type != "cpu":
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


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
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    hidden = hidden.float()  # sum in float32 whatever the model's dtype (a no-op for a float32 model)
    real = attention_mask.unsqueeze(-1).bool()
    summed = torch.where(real, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
    return summed / attention_mask.sum(dim=1, keepdim=True).to(hidden.dtype)


def embed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
          dim: Optional[int] = None, normalize: bool = True) -> torch.Tensor:
    """Pooled embeddings ``[B, dim]``, float32 whatever the model's dtype: Matryoshka truncation to ``dim`` comes
    before L2 normalisation, so the truncated vectors are unit length too."""
    pooled = pool(hidden_states(model, input_ids, attention_mask), attention_mask, pooling).float()
    if dim is not None:
        pooled = pooled[:, :dim]
    return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled

