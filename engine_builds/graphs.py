"""The embed and rerank engines as single torch modules, written to export to ONNX and build with TensorRT.

They compute what :mod:`ragstack.engines` computes (the CPU reference engines), and the export test holds them to
it, but they are written for a compiled graph rather than for eager PyTorch:

* token ids and mask come in as INT32 (the Triton contract) and are cast inside the graph;
* everything that the reference does in Python after the transformer (last-token pooling, Matryoshka truncation,
  L2 normalisation, the yes/no score) is inside the graph, so the plan returns the contract's final values;
* the attention mask is built here as an additive bias in which every position may always attend to itself. A
  left-padded row's padding positions otherwise attend to nothing: their softmax is over all ``-inf`` and gives
  NaN, and in a compiled graph that NaN reaches the real positions through ``0 * NaN`` in the next layer's
  attention product. Real positions attend exactly as in the reference (their own position is real anyway);
* the last real position is ``max(position * mask)``, a reduction that works for either padding side and maps to
  plain TensorRT layers (no ArgMax over a flipped tensor);
* the reranker multiplies the final hidden state by the difference of the two LM-head rows for "yes" and "no",
  instead of computing all vocabulary logits (151k for Qwen3) and picking two.

Only the Qwen3 (causal, last-token) models are supported: they are what production serves. The demo set's BERT
models stay on the reference profile.
"""
from __future__ import annotations

import torch

from ragstack.governance.engine_spec import EngineSpec


def _check_supported(spec: EngineSpec) -> None:
    if spec.kind == "embed" and spec.pooling != "last_token":
        raise ValueError(f"{spec.name}: only last-token pooling (Qwen3-Embedding) exports to a TensorRT plan, "
                         f"got {spec.pooling!r}")
    if spec.kind == "rerank" and spec.scoring != "qwen3_yes_no":
        raise ValueError(f"{spec.name}: only qwen3_yes_no scoring (Qwen3-Reranker) exports to a TensorRT plan, "
                         f"got {spec.scoring!r}")


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, L, L]`` additive bias: causal, padding keys hidden, the diagonal always open (see module doc)."""
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device)
    query, key = positions.view(1, 1, length, 1), positions.view(1, 1, 1, length)
    allowed = ((key <= query) & mask.bool().view(-1, 1, 1, length)) | (key == query)
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, for left or right padding. The reduction runs on the INT32 mask as
    it comes in (integer reductions in TensorRT are safest in INT32); the result indexes as INT64."""
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype).view(1, -1)
    return (positions * mask).amax(dim=1).to(torch.int64)


class _TokenGraph(torch.nn.Module):
    """Runs the decoder stack and returns the hidden state at each row's last real token."""

    def __init__(self, base_model: torch.nn.Module):
        super().__init__()
        self.base = base_model

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(torch.int64)
        mask = attention_mask.to(torch.int64)
        # Positions count real tokens only, as in the reference: a left-padded row matches the unpadded one.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        bias = attention_bias(mask, self.base.get_input_embeddings().weight.dtype)
        hidden = self.base(input_ids=ids, attention_mask=bias, position_ids=positions).last_hidden_state
        return hidden[torch.arange(hidden.shape[0]), last_positions(attention_mask)]


class EmbedGraph(_TokenGraph):
    """``(input_ids, attention_mask) -> embedding [B, dim]``: last token, Matryoshka cut, L2 norm."""

    output_name = "embedding"

    def __init__(self, model: torch.nn.Module, spec: EngineSpec):
        _check_supported(spec)
        super().__init__(model)
        hidden_size = model.get_input_embeddings().embedding_dim
        self.dim = spec.dim or hidden_size
        if self.dim > hidden_size:
            raise ValueError(f"{spec.name}: dim {self.dim} exceeds the hidden size {hidden_size}")
        self.normalize = spec.normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vectors = self.last_hidden(input_ids, attention_mask)[:, : self.dim]
        return torch.nn.functional.normalize(vectors, p=2, dim=-1) if self.normalize else vectors


class RerankGraph(_TokenGraph):
    """``(input_ids, attention_mask) -> score [B, 1]``: ``sigmoid(logit_yes - logit_no)`` after the prompt."""

    output_name = "score"

    def __init__(self, causal_lm: torch.nn.Module, spec: EngineSpec, yes_id: int, no_id: int):
        _check_supported(spec)
        super().__init__(causal_lm.base_model)
        head = causal_lm.get_output_embeddings()
        with torch.no_grad():
            direction = (head.weight[yes_id] - head.weight[no_id]).detach().clone()
            offset = (head.bias[yes_id] - head.bias[no_id]).detach().clone() if head.bias is not None \
                else torch.zeros((), dtype=direction.dtype)
        self.register_buffer("direction", direction.view(-1, 1))
        self.register_buffer("offset", offset.reshape(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = self.last_hidden(input_ids, attention_mask)
        return torch.sigmoid(last @ self.direction + self.offset)
