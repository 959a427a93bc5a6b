"""The embed engine: token ids in, final embeddings out (pooled, Matryoshka-truncated, L2-normalised)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ragstack.engines.common import (check_token_batch, embed, load_engine_spec, place_model, resolve_device,
                                     resolve_dtype, vocab_size)


class EmbeddingEngine:
    """An embed engine folder's model, on CPU in float32 by default, with the contract of its TensorRT plan:
    ``engine(input_ids, attention_mask) -> float32 [B, spec.dim]``.

    ``device`` and ``dtype`` (a torch dtype or "float32" / "bfloat16" / "float16") place the model elsewhere;
    inputs and outputs stay numpy on the host. ``model`` injects an already built transformers base model (for
    one built in memory) instead of loading the folder's weights; the folder still supplies ``engine.json``.
    """

    def __init__(self, engine_dir: Path, num_threads: Optional[int] = None, *,
                 device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype, None] = "float32",
                 model: Optional[torch.nn.Module] = None):
        self.spec = load_engine_spec(engine_dir, "embed", num_threads)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        if model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(str(engine_dir), dtype=self.dtype)
        self.model = place_model(model, self.device, self.dtype)
        hidden_size = self.model.get_input_embeddings().embedding_dim
        self.dim = self.spec.dim or hidden_size
        if self.dim > hidden_size:
            raise ValueError(f"{engine_dir}: dim {self.dim} exceeds the model's hidden size {hidden_size}")
        self.vocab_size = vocab_size(self.model)

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = check_token_batch(input_ids, attention_mask, self.vocab_size, self.spec.max_length,
                                      device=self.device)
        vectors = embed(self.model, ids, mask, self.spec.pooling, self.dim, self.spec.normalize)
        return vectors.cpu().numpy().astype(np.float32, copy=False)
