"""The rerank engine: token ids of (query, document) pairs in, one relevance score in [0, 1] per pair out."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ragstack.engines.common import (check_token_batch, embed, hidden_states, last_token_index, load_engine_spec,
                                     place_model, resolve_device, resolve_dtype, vocab_size)
from ragstack.contracts.errors import InvalidInput


class RerankEngine:
    """A rerank engine folder's model, on CPU in float32 by default: ``engine(input_ids, attention_mask) ->
    float32 [B]``. ``device`` and ``dtype`` (a torch dtype or "float32" / "bfloat16" / "float16") place the model
    elsewhere; inputs and outputs stay numpy on the host. ``model`` injects an already built model of the class
    the scoring needs (a causal LM for ``qwen3_yes_no``, a base model otherwise) instead of loading the folder's.

    ``qwen3_yes_no`` (Qwen3-Reranker): the rows are the prompts of :class:`ragstack.tokenization.retrieval.RerankTokenizer`, and
    the score is P(yes) against no for the token after the prompt, ``sigmoid(logit_yes - logit_no)``.

    ``bi_encoder_cosine`` (the demo set): no cross-encoder can be installed here, so the rows
    ``[CLS] q [SEP] d [SEP]`` are split back into ``[CLS] q [SEP]`` and ``[CLS] d [SEP]``, both are embedded
    like the embed engine does, and the score is ``(cosine + 1) / 2``. It ranks like the embedder's own
    similarity: cheap and honest, not a substitute for a trained reranker.
    """

    def __init__(self, engine_dir: Path, num_threads: Optional[int] = None, *,
                 device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype, None] = "float32",
                 model: Optional[torch.nn.Module] = None):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.spec = load_engine_spec(engine_dir, "rerank", num_threads)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(engine_dir))
        if model is None:
            loader = AutoModelForCausalLM if self.spec.scoring == "qwen3_yes_no" else AutoModel
            model = loader.from_pretrained(str(engine_dir), dtype=self.dtype)
        self.model = place_model(model, self.device, self.dtype)
        if self.spec.scoring == "qwen3_yes_no":
            self.yes_id, self.no_id = tokenizer.convert_tokens_to_ids(["yes", "no"])
            if tokenizer.unk_token_id in (self.yes_id, self.no_id) or None in (self.yes_id, self.no_id):
                raise ValueError(f"{engine_dir}: the tokenizer has no single tokens 'yes' and 'no'")
        else:
            self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
            if self.cls_id is None or self.sep_id is None:
                raise ValueError(f"{engine_dir}: bi_encoder_cosine needs a tokenizer with [CLS] and [SEP]")
        self.vocab_size = vocab_size(self.model)

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = check_token_batch(input_ids, attention_mask, self.vocab_size, self.spec.max_length,
                                      device=self.device)
        if self.spec.scoring == "qwen3_yes_no":
            scores = self._yes_no(ids, mask)
        else:
            scores = self._pair_cosine(ids, mask)
        return scores.float().cpu().numpy().astype(np.float32, copy=False)

    def _yes_no(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Only the last real position's logits are needed: run the decoder, then the LM head on B vectors
        instead of B * L."""
        hidden = hidden_states(self.model.base_model, ids, mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]
        logits = self.model.get_output_embeddings()(last).float()
        return torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id])

    def _pair_cosine(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Split every row at its first [SEP] and embed all query and document segments in one forward."""
        batch, length = ids.shape
        # Move each row's real tokens to the front (a stable sort keeps their order), whatever the padding side.
        order = torch.sort(1 - mask, dim=1, stable=True).indices
        tokens = ids.gather(1, order)
        real_count = mask.sum(dim=1)
        positions = torch.arange(length, device=ids.device)
        is_sep = (tokens == self.sep_id) & (positions < real_count.unsqueeze(1))
        if not is_sep.any(dim=1).all():
            raise InvalidInput("a bi_encoder_cosine row needs [CLS] query [SEP] document [SEP]: no [SEP] found")
        query_count = is_sep.int().argmax(dim=1) + 1              # [CLS] q [SEP]
        document_count = real_count - query_count + 1             # [CLS] d [SEP], taking [CLS] for q's [SEP]
        if (document_count < 3).any():
            raise InvalidInput("a bi_encoder_cosine row has an empty document after its first [SEP]")
        # Document segment: the tokens from the query's [SEP] on, with that [SEP] replaced by [CLS].
        source = (query_count.unsqueeze(1) - 1 + positions).clamp(max=length - 1)
        document_tokens = tokens.gather(1, source)
        document_tokens[:, 0] = self.cls_id
        counts = torch.cat([query_count, document_count])
        width = int(counts.max())
        segments = torch.cat([tokens, document_tokens])[:, :width]
        segment_mask = (positions[:width] < counts.unsqueeze(1)).long()
        vectors = embed(self.model, segments, segment_mask, self.spec.pooling)
        cosine = (vectors[:batch] * vectors[batch:]).sum(dim=1)
        return (cosine + 1) / 2
