"""The xgrammar tokenizer-info file that the TensorRT-LLM Triton backend reads for guided decoding.

The ``tensorrtllm`` backend of TensorRT-LLM 1.0 (``triton_backend/inflight_batcher_llm``) reads the file named by
the model parameter ``xgrammar_tokenizer_info_path`` as JSON and takes three keys from it:

* ``encoded_vocab``: the token strings in vocabulary encoding (byte-level tokens as the tokenizer stores them),
  index = token id; control tokens other than the stop ids are written empty, which xgrammar treats as special
  (never emitted by a grammar) -- otherwise ``<|im_start|>`` could appear inside a guided JSON string;
* ``tokenizer_str``: the fast tokenizer's serialised JSON, from which the runtime's xgrammar detects the vocabulary
  type (raw, byte-fallback, byte-level) and whether a prefix space is added;
* ``stop_token_ids``: the ids that end a guided generation.

The vocabulary size is not in the file: the runtime uses the engine's (padded) vocabulary size, so the token mask
covers every logit the engine produces. TensorRT-LLM's own ``examples/generate_xgrammar_tokenizer_info.py``
writes the same three keys. This module writes them itself (TensorRT-LLM is not installable outside its
container), indexing by token id so a vocabulary with holes keeps ids in place, and it refuses a tokenizer whose
``tokenizer_str`` would make the runtime detect another vocabulary type than the tokenizer really has: xgrammar
would then decode every token wrongly and guided outputs would be garbage, silently.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ragstack.engines.generation import guided
from ragstack.governance.manifest import TOKENIZER_INFO_FILE

KEYS = ("encoded_vocab", "tokenizer_str", "stop_token_ids")


def tokenizer_info(tokenizer, stop_token_ids: Optional[list] = None) -> dict:
    """The backend's tokenizer-info document for a Hugging Face fast tokenizer."""
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: the TensorRT-LLM runtime needs "
                         "its tokenizer_str (tokenizer.json) to detect the vocabulary type")
    if stop_token_ids is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token: give the stop token ids")
        stop_token_ids = [tokenizer.eos_token_id]
    # Control tokens other than the stop ids go in empty, so the runtime never lets a grammar emit them as text.
    encoded_vocab = guided.encoded_vocab(tokenizer, guided.control_token_ids(tokenizer, keep=stop_token_ids))
    tokenizer_str = tokenizer.backend_tokenizer.to_str()

    # What the runtime will detect from tokenizer_str, against what xgrammar finds for the tokenizer itself.
    runtime = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer_str)
    actual = xgrammar.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=list(stop_token_ids))
    if (runtime["vocab_type"], runtime["add_prefix_space"]) != (actual.vocab_type, actual.add_prefix_space):
        raise ValueError(f"tokenizer_str describes a {runtime['vocab_type'].name} vocabulary (add_prefix_space="
                         f"{runtime['add_prefix_space']}) but the tokenizer is {actual.vocab_type.name} "
                         f"(add_prefix_space={actual.add_prefix_space}): the runtime would decode tokens wrongly")
    return {"encoded_vocab": encoded_vocab, "tokenizer_str": tokenizer_str,
            "stop_token_ids": [int(i) for i in stop_token_ids]}


def write_tokenizer_info(tokenizer_dir: Path, out_path: Optional[Path] = None,
                         stop_token_ids: Optional[list] = None) -> Path:
    """Write the tokenizer info of ``tokenizer_dir`` (default: ``tokenizer_info.json`` inside it)."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    out_path = Path(out_path) if out_path else tokenizer_dir / TOKENIZER_INFO_FILE
    info = tokenizer_info(AutoTokenizer.from_pretrained(str(tokenizer_dir)), stop_token_ids)
    out_path.write_text(json.dumps(info, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_path


def read_tokenizer_info(path: Path) -> dict:
    """Read a tokenizer-info file the way the backend does: the three keys, each of the right type."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    if not (isinstance(data["encoded_vocab"], list) and all(isinstance(t, str) for t in data["encoded_vocab"])):
        raise ValueError(f"{path}: encoded_vocab must be a list of strings")
    if not isinstance(data["tokenizer_str"], str):
        raise ValueError(f"{path}: tokenizer_str must be a string")
    if not (isinstance(data["stop_token_ids"], list) and all(isinstance(i, int) for i in data["stop_token_ids"])):
        raise ValueError(f"{path}: stop_token_ids must be a list of integers")
    return data


def runtime_tokenizer_info(info: dict, vocab_size: int):
    """The ``xgrammar.TokenizerInfo`` the C++ runtime builds from the file: metadata detected from
    ``tokenizer_str``, the vocabulary padded to the engine's ``vocab_size``, the file's stop ids."""
    import xgrammar

    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(info["tokenizer_str"])
    return xgrammar.TokenizerInfo(info["encoded_vocab"], metadata["vocab_type"], vocab_size=vocab_size,
                                  stop_token_ids=info["stop_token_ids"],
                                  add_prefix_space=metadata["add_prefix_space"])
