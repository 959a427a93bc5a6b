"""Prompt building and detokenization for the generate engine (runs inside the BLS models: the `tokenizers`
library and jinja2 for the chat template, no transformers, no torch)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

from ragstack.governance.engine_spec import EngineSpec
from ragstack.contracts.errors import InvalidInput
from ragstack.tokenization.fast_tokenizer import shared_tokenizer


class GeneratorTokenizer:
    """The generator's tokenizer and chat template, with the engine's end/pad ids and length limits."""

    def __init__(self, engine_dir: Path, tokenizer_dir: Optional[Path] = None):
        self.spec = EngineSpec.read(engine_dir)
        self.tokenizer = shared_tokenizer(tokenizer_dir or engine_dir)
        self.end_id = self.spec.end_id
        self.pad_id = self.spec.pad_id if self.spec.pad_id is not None else self.spec.end_id
        self._compile_chat_template()

    def _compile_chat_template(self) -> None:
        """Compile the chat template at load: the first render otherwise pays it (17 ms on the tiny generator's
        template, 0.8 ms for each later prompt), once per model instance, inside a request's ``tokenize`` stage. A
        folder without a template, or with one that does not compile, fails at its first prompt as before."""
        from ragstack.tokenization import chat_template

        templates = getattr(self.tokenizer, "chat_template", None)
        if templates is None:
            return
        try:
            chat_template.compile_template(chat_template.select_template(templates))
        except Exception:  # noqa: BLE001 - the first prompt reports it, with the request
            pass

    def prompt_ids(self, prompt: str, system: Optional[str] = None, raw: bool = False) -> list:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput("prompt is empty")
        # Cached: the RAG orchestrator counts a prompt's tokens to fit its contexts, then sends the same
        # prompt, and the same chunks come back across queries.
        return list(self._prompt_ids(prompt, system, raw))

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - one tokenizer per model instance, kept for its life
    def _prompt_ids(self, prompt: str, system: Optional[str], raw: bool) -> tuple:
        if raw:
            text = prompt
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def count_prompt(self, system: Optional[str], user: str) -> int:
        """Prompt tokens as the generate engine will see them (chat template applied)."""
        return len(self.prompt_ids(user, system or None))

    def prompt_limit(self, max_tokens: int) -> int:
        """The most prompt tokens the engine takes beside ``max_tokens`` completion tokens."""
        spec = self.spec
        return min(spec.max_input_len or spec.max_seq_len, spec.max_seq_len - max_tokens)

    def count_texts(self, texts: list) -> list:
        """Tokens of each text alone (no template, no special tokens), in one batched tokenizer call."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]] \
            if texts else []

    def check_budget(self, n_prompt: int, max_tokens: int) -> None:
        limit_in = self.spec.max_input_len or self.spec.max_seq_len
        if n_prompt > limit_in:
            raise InvalidInput(f"prompt is {n_prompt} tokens; the generate engine accepts at most {limit_in}")
        if max_tokens < 1:
            raise InvalidInput(f"max_tokens must be at least 1, got {max_tokens}")
        if n_prompt + max_tokens > self.spec.max_seq_len:
            raise InvalidInput(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the engine's "
                               f"max_seq_len {self.spec.max_seq_len}")

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self.decode)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals decoding all ids at once.

    A token can end in the middle of a UTF-8 character (byte-level BPE); such a tail decodes to U+FFFD and is
    held back until the next token completes it.
    """

    def __init__(self, decode):
        self._decode = decode
        self.ids: list = []
        self._emitted = ""

    def push(self, new_ids) -> str:
        self.ids.extend(int(i) for i in new_ids)
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self._emitted):] if text.startswith(self._emitted) else text
        self._emitted = text
        return delta

    def flush(self) -> str:
        text = self._decode(self.ids)
        delta = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return delta
