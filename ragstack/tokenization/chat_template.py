"""Chat templates rendered with jinja2 alone, the way transformers' ``apply_chat_template`` renders them.

The BLS models only need a model's chat template turned into a prompt string; importing transformers for that
costs a stub ~390 MB and ~3 s (it pulls in torch). This module reproduces what transformers 5 does around
``jinja2``: an ``ImmutableSandboxedEnvironment`` (templates are untrusted code from a model folder) with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, a ``tojson`` filter
that does not HTML-escape, ``strftime_now``, a restricted ``dict`` and ``namespace``; the messages rebuilt from
plain JSON types; the tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) as variables, and
``add_generation_prompt``. ``tests/unit/test_lean_tokenizer.py`` compares the output with transformers' on both
model sets. Not reproduced: ``{% generation %}`` assistant masks and ``continue_final_message``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
CHAT_TEMPLATE_JSON = "chat_template.json"


def read_chat_templates(folder: Path, config: dict) -> Optional[object]:
    """The folder's chat template(s) as transformers reads them: ``chat_template.jinja`` and the
    ``additional_chat_templates/*.jinja`` files take priority over ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of ``{"name", "template"}``). One default template gives a string, several a dict."""
    folder = Path(folder)
    templates: dict[str, str] = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name[:-len(".jinja")]] = path.read_text(encoding="utf-8")
    if not templates and (folder / CHAT_TEMPLATE_JSON).is_file():
        templates["default"] = json.loads((folder / CHAT_TEMPLATE_JSON).read_text(encoding="utf-8"))["chat_template"]
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):
        return {entry["name"]: entry["template"] for entry in template}
    return template


def select_template(templates, name: Optional[str] = None) -> str:
    """One template: the single one, or of several the named one (``default`` when none is named)."""
    if templates is None:
        raise ValueError("this tokenizer has no chat template (no chat_template.jinja, no chat_template in "
                         "tokenizer_config.json)")
    if isinstance(templates, str):
        return templates
    name = name or "default"
    if name not in templates:
        raise ValueError(f"no chat template named {name!r}: this folder has {sorted(templates)}")
    return templates[name]


def plain(value: Any) -> Any:
    """What a template may see: plain JSON types only (the sandbox does not know other objects' methods)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and type(value).__module__ == "numpy":
        return plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The template compiled in a sandboxed environment configured as transformers configures its own."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        """``dict(...)`` and ``dict.fromkeys(...)``, nothing else of the type."""
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed names (no way to CPython internals)."""
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for key in attrs:
                TemplateNamespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            TemplateNamespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {key!r}")

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses it for assistant masks,
        which are not computed here)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


def render(source: str, messages: list, *, add_generation_prompt: bool = False, special_tokens: Optional[dict] = None,
           tools: Optional[list] = None, documents: Optional[list] = None, **kwargs) -> str:
    """The prompt string for ``messages`` (a list of ``{"role", "content", ...}`` dicts).

    ``special_tokens`` are the tokenizer's named special tokens (``{"bos_token": "<s>", ...}``); ``kwargs`` are
    further template variables and override them, as in transformers. Keys whose value is None are dropped from
    each message (many templates would print "None")."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        chat.append(plain({k: v for k, v in message.items() if v is not None}))
    for i, message in enumerate(chat):      # a message's reasoning under the names templates read
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning")
                          if message.get(k) is not None), None)
        if reasoning is not None:
            chat[i] = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    variables = plain({**(special_tokens or {}), **kwargs})
    return compile_template(source).render(messages=chat, tools=plain(tools), documents=plain(documents),
                                           add_generation_prompt=add_generation_prompt, **variables)
