"""A model folder's tokenizer with the Rust ``tokenizers`` library alone: no transformers, no torch.

The BLS models tokenize for the engines. ``transformers.AutoTokenizer`` costs a Triton stub ~390 MB and ~3 s
(transformers pulls in torch); ``tokenizers`` is ~17 MB. :class:`FastTokenizer` reads the same files
transformers 5 reads for a fast tokenizer — ``tokenizer.json``, then ``tokenizer_config.json`` (and
``special_tokens_map.json`` when the config has no ``added_tokens_decoder``) for the named special tokens and
added tokens, and the chat template(s) — and registers the special tokens as transformers does. It offers the
part of the ``PreTrainedTokenizerFast`` API the project uses (``__call__``, ``encode``, ``decode``,
``convert_tokens_to_ids``, ``*_token_id``, ``num_special_tokens_to_add``, ``apply_chat_template``), with the same
results: ``tests/unit/test_lean_tokenizer.py`` compares it with transformers on both model sets.

Differences, on purpose: a folder without ``tokenizer.json`` (a slow-only, sentencepiece tokenizer) is refused
rather than converted; no tensors, padding or overflow in ``__call__`` (the callers pad themselves); truncation
is done per call on the encodings (the backend's own truncation setting is never changed), so threads sharing a
tokenizer cannot overwrite each other's settings (transformers' fast tokenizers can).

Memory: :func:`shared_tokenizer` gives one instance per distinct set of tokenizer files in a process (the
orchestrators hold the embed, rerank and generate tokenizers; the demo's embed and rerank folders share
all-MiniLM's, the tiny set's three are one), and returns the heap the JSON parse of ``tokenizer.json`` left free
to the OS (glibc ``malloc_trim``; ~16 MB after SmolLM2's 49k-token BPE).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import threading
import weakref
from pathlib import Path
from typing import Optional, Sequence, Union

from ragstack.tokenization import chat_template

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TRUNCATION_STRATEGIES = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
                         "only_second": "only_second"}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(value) -> Optional[str]:
    """A special token as written in a config: a string, or a serialized AddedToken (``{"content": ...}``)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_token(value, special: bool):
    from tokenizers import AddedToken

    if isinstance(value, dict):
        fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=bool(value.get("special", special)), **fields)
    return AddedToken(value, special=special)


class FastTokenizer:
    """The tokenizer of a Hugging Face model folder (one that has ``tokenizer.json``)."""

    is_fast = True

    def __init__(self, folder: Union[str, Path]):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{folder}: no {TOKENIZER_FILE}; the BLS models tokenize with the `tokenizers` library "
                             "(save the tokenizer with transformers' save_pretrained to write one)")
        self.name_or_path = str(folder)
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()      # a sentence-transformers tokenizer.json may fix both (e.g. at 128)
        self._tokenizer.no_padding()
        config = _read_json(folder / CONFIG_FILE)
        if "added_tokens_decoder" not in config:              # transformers reads the map only then
            for key, value in _read_json(folder / SPECIAL_TOKENS_MAP_FILE).items():
                if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                    config["extra_special_tokens"] = list(config.get("extra_special_tokens") or []) + \
                        [v for v in value if v not in (config.get("extra_special_tokens") or [])]
                else:
                    config[key] = value
        self.config = config
        self._named = {name: _content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        self._register_special_tokens(config)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.truncation_side = config.get("truncation_side", "right")
        self.chat_template = chat_template.read_chat_templates(folder, config)
        self._truncating: dict = {}
        self._lock = threading.Lock()

    def _register_special_tokens(self, config: dict) -> None:
        """Add what transformers adds to the backend at load: the config's ``added_tokens_decoder`` entries,
        named special tokens and extra special tokens the backend does not know as added tokens yet."""
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)   # a dict: model-specific names
        extra += [v for k, v in config.items() if k.endswith("_token") and k not in SPECIAL_TOKEN_NAMES
                  and isinstance(v, (str, dict))]
        known = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        to_add = []
        decoder = config.get("added_tokens_decoder") or {}
        for _, value in sorted(decoder.items(), key=lambda item: int(item[0])):
            if _content(value) not in known:
                to_add.append(_added_token(value, special=bool(value.get("special", False))))
        wanted = [v for v in self._named.values() if v] + [_content(v) for v in extra if _content(v)]
        for token in wanted:
            if token not in known and token not in [t.content for t in to_add]:
                to_add.append(_added_token(token, special=True))
        self.extra_special_tokens = [_content(v) for v in extra if _content(v)]
        if to_add:
            self._tokenizer.add_tokens(to_add)

    # ----------------------------------------------------------------------------------- special tokens
    def __getattr__(self, name: str):
        # bos_token, eos_token, ... and bos_token_id, ...: the named special tokens, None when not set
        named = self.__dict__.get("_named")
        if named is not None and name in SPECIAL_TOKEN_NAMES:
            return named[name]
        if named is not None and name.endswith("_id") and name[:-3] in SPECIAL_TOKEN_NAMES:
            token = named[name[:-3]]
            return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(name)

    @property
    def special_tokens_map(self) -> dict:
        """The named special tokens that are set (the chat template's variables)."""
        return {name: token for name, token in self._named.items() if token is not None}

    @property
    def all_special_tokens(self) -> list:
        return list(dict.fromkeys(list(self.special_tokens_map.values()) + self.extra_special_tokens))

    @property
    def all_special_ids(self) -> list:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def backend_tokenizer(self):
        return self._tokenizer

    def get_vocab(self) -> dict:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        """A token's id (the unknown token's id when it is not in the vocabulary); a list for a list."""
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            if index is None:
                unk = self._named["unk_token"]
                return None if unk is None else self._tokenizer.token_to_id(unk)
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair)

    # ----------------------------------------------------------------------------------- encoding
    def _strategy(self, truncation, max_length: Optional[int]) -> Optional[str]:
        if truncation in (False, None, "do_not_truncate") or max_length is None:
            return None
        strategy = TRUNCATION_STRATEGIES.get(truncation)
        if strategy is None:
            raise ValueError(f"truncation must be True, False or one of {sorted(set(TRUNCATION_STRATEGIES.values()))}"
                             f", got {truncation!r}")
        return strategy

    def _pair_backend(self, max_length: int):
        """A backend with fixed longest_first truncation, for pairs only (the project never truncates a pair that
        way; kept so the API is complete). One per max_length, never changed after it is made."""
        backend = self._truncating.get(max_length)
        if backend is None:
            from tokenizers import Tokenizer

            with self._lock:
                backend = self._truncating.get(max_length)
                if backend is None:
                    backend = Tokenizer.from_str(self._tokenizer.to_str())     # with the registered tokens
                    backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                              direction=self.truncation_side)
                    backend.no_padding()
                    self._truncating[max_length] = backend
        return backend

    def _truncated(self, inputs: list, pair: bool, add_special_tokens: bool, strategy: str, max_length: int):
        """Encode without special tokens, cut as the library's truncation would (the room left after the special
        tokens; a single sequence from its end, a pair's only_first/only_second sequence alone), then add the
        special tokens: the same ids, offsets and masks, with no truncation state shared between calls."""
        if pair and strategy == "longest_first":
            backend = self._pair_backend(max_length)
            return backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
        if not pair and strategy == "only_second":
            raise ValueError("truncation='only_second' needs a second sequence (text_pair)")
        room = max_length - (self._tokenizer.num_special_tokens_to_add(pair) if add_special_tokens else 0)
        if room < 0:
            raise ValueError(f"max_length {max_length} leaves no room beside the special tokens")
        out = []
        if pair:
            firsts = self._tokenizer.encode_batch([a for a, _ in inputs], add_special_tokens=False)
            seconds = self._tokenizer.encode_batch([b for _, b in inputs], add_special_tokens=False)
            for first, second in zip(firsts, seconds):
                cut = second if strategy == "only_second" else first
                excess = len(first) + len(second) - room
                if excess > 0:
                    if len(cut) <= excess:
                        raise ValueError("the sequence to truncate is too short to respect max_length "
                                         f"{max_length}")
                    cut.truncate(len(cut) - excess, stride=0, direction=self.truncation_side)
                out.append(self._tokenizer.post_process(first, second, add_special_tokens=add_special_tokens))
        else:
            for encoding in self._tokenizer.encode_batch(inputs, add_special_tokens=False):
                if len(encoding) > room:
                    encoding.truncate(room, stride=0, direction=self.truncation_side)
                out.append(self._tokenizer.post_process(encoding, None, add_special_tokens=add_special_tokens))
        return out

    def __call__(self, text, text_pair=None, add_special_tokens: bool = True, truncation=False,
                 max_length: Optional[int] = None, return_offsets_mapping: bool = False,
                 return_attention_mask: bool = True, **_ignored) -> dict:
        """``{"input_ids", "attention_mask"[, "offset_mapping"]}`` for a string (lists of ints) or a list of
        strings (lists of lists), with ``text_pair`` the second sequence(s). No padding, no tensors."""
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        pairs = None
        if text_pair is not None:
            pairs = list(text_pair) if batched else [text_pair]
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
        for item in texts + (pairs or []):
            if not isinstance(item, str):
                raise TypeError(f"text input must be a string, got {type(item).__name__}")
        inputs = list(zip(texts, pairs)) if pairs is not None else texts
        strategy = self._strategy(truncation, max_length)
        if strategy is None:
            encodings = self._tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
        else:
            encodings = self._truncated(inputs, pairs is not None, add_special_tokens, strategy, int(max_length))
        out = {"input_ids": [e.ids for e in encodings]}
        if return_attention_mask:
            out["attention_mask"] = [e.attention_mask for e in encodings]
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        if not batched:
            out = {k: v[0] for k, v in out.items()}
        return out

    def encode(self, text: str, text_pair: Optional[str] = None, add_special_tokens: bool = True,
               truncation=False, max_length: Optional[int] = None) -> list:
        return self(text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                    max_length=max_length, return_attention_mask=False)["input_ids"]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        if isinstance(ids, int):
            ids = [ids]
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        # transformers skips the clean-up for BPE models: it would delete real spaces before punctuation
        if clean and type(self._tokenizer.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences: Sequence, **kwargs) -> list:
        return [self.decode(ids, **kwargs) for ids in sequences]

    # ----------------------------------------------------------------------------------- chat
    def get_chat_template(self, name: Optional[str] = None) -> str:
        return chat_template.select_template(self.chat_template, name)

    def apply_chat_template(self, conversation: list, tokenize: bool = True, add_generation_prompt: bool = False,
                            chat_template_name: Optional[str] = None, tools=None, documents=None, **kwargs):
        """The conversation rendered with the chat template (str), or its token ids when ``tokenize``
        (special tokens come from the template only, as in transformers)."""
        text = chat_template.render(self.get_chat_template(chat_template_name), conversation,
                                    add_generation_prompt=add_generation_prompt, special_tokens=self.special_tokens_map,
                                    tools=tools, documents=documents, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


_SHARED: "weakref.WeakValueDictionary[str, FastTokenizer]" = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()
_KEY_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, chat_template.CHAT_TEMPLATE_FILE,
              chat_template.CHAT_TEMPLATE_JSON)


def _files_key(folder: Path) -> str:
    """What makes two folders' tokenizers the same: the contents of every file FastTokenizer reads."""
    digest = hashlib.sha256()
    paths = [folder / name for name in _KEY_FILES]
    paths += sorted((folder / chat_template.CHAT_TEMPLATE_DIR).glob("*.jinja"))
    for path in paths:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"\1absent")
        digest.update(b"\0")
    return digest.hexdigest()


def release_free_memory() -> None:
    """Give the heap freed after loading back to the OS (glibc only; elsewhere nothing happens)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def shared_tokenizer(folder: Union[str, Path]) -> FastTokenizer:
    """The folder's :class:`FastTokenizer`, shared with every other folder of this process whose tokenizer files
    are identical (kept while someone holds it). A FastTokenizer has no per-call state, so sharing is safe."""
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        return FastTokenizer(folder)                    # raises the clear error
    key = _files_key(folder)
    with _SHARED_LOCK:
        tokenizer = _SHARED.get(key)
        if tokenizer is None:
            tokenizer = FastTokenizer(folder)
            _SHARED[key] = tokenizer
            release_free_memory()
    return tokenizer
