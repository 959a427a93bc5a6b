"""``engine.json``: what an engine folder is, read by the engines and by the BLS models that tokenize for them.

The BLS side must format and tokenize exactly as the engine expects (Qwen3-Embedding's instruct prefix and
end-of-text, the reranker's prompt, the generator's end/pad ids), whatever profile serves the engine; so the
facts live next to the weights, in one small file, and both sides read the same file.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

ENGINE_FILE = "engine.json"
KINDS = ("embed", "rerank", "generate")
POOLINGS = ("last_token", "mean")
SCORINGS = ("qwen3_yes_no", "bi_encoder_cosine")


@dataclasses.dataclass
class EngineSpec:
    kind: str
    name: str
    family: str = "qwen3"
    # embed / rerank
    pooling: Optional[str] = None          # last_token (Qwen3-Embedding) or mean (sentence-transformers BERT)
    dim: Optional[int] = None              # Matryoshka truncation before L2 normalisation
    normalize: bool = True
    append_eos: bool = False               # Qwen3-Embedding appends <|endoftext|> to every input
    eos_token: Optional[str] = None
    padding_side: str = "left"
    max_length: int = 512
    query_template: str = "{query}"        # e.g. "Instruct: {task}\nQuery:{query}"
    default_task: Optional[str] = None
    scoring: Optional[str] = None          # rerank only
    # generate
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_input_len: Optional[int] = None
    max_seq_len: Optional[int] = None
    max_batch_size: Optional[int] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"engine kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "embed" and self.pooling not in POOLINGS:
            raise ValueError(f"embed engine needs pooling in {POOLINGS}, got {self.pooling!r}")
        if self.kind == "rerank" and self.scoring not in SCORINGS:
            raise ValueError(f"rerank engine needs scoring in {SCORINGS}, got {self.scoring!r}")
        if self.kind == "rerank" and self.scoring == "bi_encoder_cosine" and self.pooling not in POOLINGS:
            raise ValueError("a bi_encoder_cosine reranker needs a pooling")
        if self.kind == "generate" and (self.end_id is None or self.max_seq_len is None):
            raise ValueError("generate engine needs end_id and max_seq_len")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {self.padding_side!r}")

    def write(self, folder: Path) -> Path:
        path = Path(folder) / ENGINE_FILE
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> "EngineSpec":
        path = Path(folder) / ENGINE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: build the models first (tools/build_models.py)") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}")
        return cls(**data)
