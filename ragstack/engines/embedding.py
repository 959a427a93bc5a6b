"""The embed engine: token ids in, final embeddings out (pooled, Matryoshka-truncated, L2-normalised)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ragstack.engines import check_token_batch, embed, load_engine_spec, vocab_size


class EmbeddingEngine:
    """An embed engine folder's model on CPU, float32, with the contract of its TensorRT plan:
    ``engine(input_ids, attention_mask) -> float32 [B, spec.dim]``."""

    def __init__(self, engine_dir: Path, num_threads: Optional[int] = None):
        from transformers import AutoModel

        self.spec = load_engine_spec(engine_dir, "embed", num_threads)
        self.model = AutoModel.from_pretrained(str(engine_dir), dtype=torch.float32).eval()
        hidden_size = self.model.get_input_embeddings().embedding_dim
        self.dim = self.spec.dim or hidden_size
        if self.dim > hidden_size:
            raise ValueError(f"{engine_dir}: dim {self.dim} exceeds the model's hidden size {hidden_size}")
        self.vocab_size = vocab_size(self.model)

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = check_token_batch(input_ids, attention_mask, self.vocab_size, self.spec.max_length)
        vectors = embed(self.model, ids, mask, self.spec.pooling, self.dim, self.spec.normalize)
        return vectors.numpy().astype(np.float32, copy=False)
