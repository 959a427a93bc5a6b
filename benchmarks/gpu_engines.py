#!/usr/bin/env python3
"""The reference engines on one GPU: in-flight batching throughput, batched-vs-alone greedy, embedding batches.

On the GPU machine (one H100; torch with CUDA, transformers; no network, no pip), from the repository root, with
build/models/tiny/generate copied to gpu_carry/tiny-generate (only its tokenizer files are used):

  PYTHONPATH=. python3 benchmarks/gpu_engines.py --tokenizer gpu_carry/tiny-generate --device cuda

CPU smoke test (a much smaller model and workload; well under a minute):

  .venv/bin/python benchmarks/gpu_engines.py --tokenizer build/models/tiny/generate --device cpu --small

Nothing is downloaded. A randomly initialised Qwen3 shaped like Qwen3-0.6B (hidden 1024, 28 layers, 16 query
heads, 8 KV heads, head_dim 128, intermediate 3072, vocab 151936, tied embeddings) is built in memory from a
fixed seed and saved to a temporary folder with the tiny tokenizer and an engine.json (generate, end_id -1,
max_seq_len 4096); prompts are random ids below the tokenizer's size, so its small vocabulary does not matter.

Measured (bfloat16 on CUDA unless --dtype says otherwise):

* generation: :class:`InflightBatchingEngine` ``(device, dtype)`` in a closed loop at concurrency 1, 8 and 32
  (each of C client threads sends its next request when the previous one finishes): greedy, 256-token prompts,
  128 new tokens, end_id -1 so every request runs to its cap. Total output tokens/s and the ratios to
  concurrency 1, plus time to first token and per-request latency.
* batched == alone: four greedy requests of different prompt lengths and caps, first each alone, then
  staggered (each submitted once the previous one has streamed 8 tokens) so that they join and leave a running
  batch; whether every request's tokens are identical, in the benchmark dtype and in float32. On a GPU,
  where kernels differ by batch shape, close logits can flip a greedy choice, so a difference is possible and is
  reported, with the first differing position (and how many distinct tokens each request produced, to show
  that the check is not trivial: the random model is initialised with std 0.05 so that it does not just repeat
  one token).
* embedding: :class:`EmbeddingEngine` on the same random weights as a Qwen3Model (last-token pooling, 1024
  truncated to 768, L2-normalised): batches of 1, 16 and 64 sequences of 256 tokens, texts/s and ratios.

Guided decoding is not measured (random weights). xgrammar is optional: when it cannot be imported, an empty
placeholder module stands in for it so that ragstack.engines.generation imports; guides would be refused.

Writes $OUT/gpu_engines.json (OUT defaults to results/). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt")
QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960)
SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=256, vocab_size=8192, max_position_embeddings=4096)
MAX_SEQ_LEN = 4096
# transformers' default 0.02 makes this random model nearly a constant map (greedy repeats one token whatever
# the prompt), which would make the batched == alone check trivially pass; 0.05 gives varied tokens.
INITIALIZER_RANGE = 0.05


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_xgrammar() -> str:
    """Import xgrammar, or register an empty placeholder module in its place: a module that imports xgrammar at
    load time then imports, and ragstack's guide compiler, finding no xgrammar API, refuses guides."""
    try:
        import xgrammar  # noqa: F401
        return f"installed {version('xgrammar')}"
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    sys.modules["xgrammar"] = types.ModuleType("xgrammar", "placeholder: xgrammar is not installed")
    return f"absent, placeholder used ({reason})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


# ---- model folder ------------------------------------------------------------------------------------------------

def build_model_folder(folder: Path, tokenizer_dir: Path, shape: dict, seed: int, device: torch.device,
                       dtype: torch.dtype) -> dict:
    """A random Qwen3ForCausalLM of ``shape`` saved in ``dtype`` with the tokenizer files and an engine.json."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ragstack.governance.engine_spec import EngineSpec

    config = Qwen3Config(**shape, tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False,
                         initializer_range=INITIALIZER_RANGE,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.device(device):  # initialise where it is fast; the values depend only on the seed and device
        model = Qwen3ForCausalLM(config)
    model = model.to(dtype)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, folder / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise SystemExit(f"{tokenizer_dir}: no tokenizer files found")
    EngineSpec(kind="generate", name="random-qwen3-0.6b-shape", end_id=-1, pad_id=0, max_seq_len=MAX_SEQ_LEN,
               max_input_len=MAX_SEQ_LEN - 256, max_batch_size=64).write(folder)
    return {"parameters": parameters, "build_and_save_s": round(time.perf_counter() - started, 2),
            "tokenizer_files": copied}


def random_prompt(rng: np.random.Generator, length: int, id_limit: int) -> list[int]:
    return rng.integers(10, id_limit, size=length).tolist()


# ---- generation --------------------------------------------------------------------------------------------------

def closed_loop(engine, concurrency: int, per_worker: int, prompt_len: int, new_tokens: int, id_limit: int,
                seed: int) -> dict:
    """``concurrency`` client threads, each sending ``per_worker`` greedy requests one after another."""
    from ragstack.engines.generation import GenerationRequest

    rng = np.random.default_rng(seed)
    requests = [[GenerationRequest(random_prompt(rng, prompt_len, id_limit), new_tokens, end_id=-1,
                                   temperature=0.0, exclude_input_in_output=True) for _ in range(per_worker)]
                for _ in range(concurrency)]
    results, errors = [], []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def worker(own):
        start.wait()
        for request in own:
            try:
                result = engine.generate(request, timeout=600)
            except Exception as exc:  # reported, not fatal
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker, args=(own,), daemon=True) for own in requests]
    for thread in threads:
        thread.start()
    before = engine.stats()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - t0
    after = engine.stats()
    tokens = sum(r.num_output_tokens for r in results)
    steps = after["steps"] - before["steps"]
    ttft = [(r.first_token_time_ns - r.arrival_time_ns) / 1e6 for r in results if r.first_token_time_ns]
    latency = [(r.last_token_time_ns - r.arrival_time_ns) / 1e6 for r in results if r.last_token_time_ns]
    reasons = sorted({r.finish_reason for r in results})
    return {
        "concurrency": concurrency, "requests": len(results), "errors": errors[:5], "finish_reasons": reasons,
        "prompt_tokens": prompt_len, "max_new_tokens": new_tokens, "output_tokens": tokens,
        "seconds": round(seconds, 3), "output_tokens_per_s": round(tokens / seconds, 2),
        "requests_per_s": round(len(results) / seconds, 3),
        "decode_steps": steps, "prefills": after["prefills"] - before["prefills"],
        "mean_decode_batch": round((tokens - len(results)) / steps, 2) if steps else None,
        "max_batch_seen": after["max_batch_seen"],
        "ms_per_decode_step": round(seconds * 1000 / steps, 2) if steps else None,
        "ttft_ms": {"p50": round(percentile(ttft, 50), 1), "p90": round(percentile(ttft, 90), 1)},
        "latency_ms": {"p50": round(percentile(latency, 50), 1), "max": round(max(latency, default=0), 1)},
    }


def batched_vs_alone(engine, id_limit: int, seed: int, stagger_tokens: int = 8) -> dict:
    """Four greedy requests alone, then staggered into one running batch; are the tokens identical?"""
    from ragstack.engines.generation import GenerationRequest

    rng = np.random.default_rng(seed)
    shapes = [(256, 64), (200, 48), (64, 64), (300, 32)]  # (prompt tokens, max new tokens): they leave apart
    prompts = [random_prompt(rng, length, id_limit) for length, _ in shapes]

    def request(i, streaming=False):
        return GenerationRequest(prompts[i], shapes[i][1], end_id=-1, temperature=0.0, streaming=streaming,
                                 exclude_input_in_output=True)

    alone = [engine.generate(request(i), timeout=600).output_ids for i in range(len(shapes))]
    before = engine.stats()
    handles, started = [], [threading.Event() for _ in shapes]

    def on_update(i):
        count = [0]

        def update(new_ids, done, result):
            count[0] += len(new_ids)
            if count[0] >= stagger_tokens or done:
                started[i].set()
        return update

    for i in range(len(shapes)):
        handles.append(engine.submit(request(i, streaming=True), on_update(i)))
        started[i].wait(600)  # the next request joins while this one (and those before it) are decoding
    together = [h.wait(600).output_ids for h in handles]
    per_request = []
    for i, (a, b) in enumerate(zip(alone, together)):
        first_diff = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first_diff is None and len(a) != len(b):
            first_diff = min(len(a), len(b))
        per_request.append({"prompt_tokens": shapes[i][0], "max_new_tokens": shapes[i][1],
                            "identical": a == b, "first_difference_at": first_diff,
                            "distinct_tokens_alone": len(set(a)),
                            "matching_prefix_tokens": len(a) if first_diff is None else first_diff})
    steps = engine.stats()["steps"] - before["steps"]
    decoded = sum(len(t) - 1 for t in together)  # every request's first token comes from its prefill
    return {"identical": all(r["identical"] for r in per_request), "stagger_tokens": stagger_tokens,
            "decode_steps": steps, "mean_decode_batch": round(decoded / steps, 2) if steps else None,
            "requests": per_request}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- embedding ---------------------------------------------------------------------------------------------------

def embedding_throughput(folder: Path, device: torch.device, dtype: torch.dtype, batches: list[int],
                         seq_len: int, dim: int, id_limit: int, min_seconds: float, seed: int) -> dict:
    from transformers import AutoModel

    from ragstack.governance.engine_spec import EngineSpec
    from ragstack.engines.embedding import EmbeddingEngine

    embed_dir = folder / "embed"
    embed_dir.mkdir()
    EngineSpec(kind="embed", name="random-qwen3-0.6b-shape-embedding", pooling="last_token", dim=dim,
               normalize=True, max_length=max(512, seq_len)).write(embed_dir)
    # The generator's weights as a headless Qwen3Model (the tied LM head is dropped), injected into the engine.
    model = AutoModel.from_pretrained(str(folder), dtype=dtype)
    engine = EmbeddingEngine(embed_dir, device=device, dtype=dtype, model=model)
    rng = np.random.default_rng(seed)
    out = {"model_class": type(engine.model).__name__, "pooling": "last_token", "dim": engine.dim,
           "hidden_size": engine.model.config.hidden_size, "sequence_tokens": seq_len, "batches": {}}
    for batch in batches:
        ids = rng.integers(10, id_limit, size=(batch, seq_len)).astype(np.int32)
        mask = np.ones_like(ids)
        vectors = engine(ids, mask)  # warm-up (and a shape check)
        assert vectors.shape == (batch, engine.dim) and vectors.dtype == np.float32, vectors.shape
        iterations, t0 = 0, time.perf_counter()
        while True:
            engine(ids, mask)  # returns numpy on the host, so each call is complete when it returns
            iterations += 1
            seconds = time.perf_counter() - t0
            if seconds >= min_seconds and iterations >= 3:
                break
        out["batches"][str(batch)] = {"batch": batch, "iterations": iterations, "seconds": round(seconds, 3),
                                      "ms_per_batch": round(seconds * 1000 / iterations, 2),
                                      "texts_per_s": round(batch * iterations / seconds, 2),
                                      "tokens_per_s": round(batch * seq_len * iterations / seconds, 1),
                                      "norm_check": round(float(np.linalg.norm(vectors, axis=1).mean()), 4)}
        progress(f"embedding batch {batch}: {out['batches'][str(batch)]['texts_per_s']} texts/s")
    base = out["batches"][str(batches[0])]["texts_per_s"]
    out["ratios_to_batch_%d" % batches[0]] = {str(b): round(out["batches"][str(b)]["texts_per_s"] / base, 2)
                                              for b in batches}
    del engine, model
    free(device)
    return out


# ---- main --------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, type=Path,
                        help="folder with the tiny tokenizer (build/models/tiny/generate or a copy)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--small", action="store_true", help="a small model and workload, for a CPU smoke test")
    parser.add_argument("--concurrency", default=None, help="comma-separated; default 1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 256 (64 with --small)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --small)")
    parser.add_argument("--requests-per-worker", type=int, default=None, help="default 3 (1 with --small)")
    parser.add_argument("--embed-batches", default="1,16,64")
    parser.add_argument("--embed-tokens", type=int, default=None, help="default 256 (64 with --small)")
    parser.add_argument("--embed-dim", type=int, default=None, help="default 768 (96 with --small)")
    parser.add_argument("--embed-seconds", type=float, default=None, help="per batch size; default 5 (0.5 small)")
    parser.add_argument("--no-fp32-check", action="store_true", help="skip the float32 batched == alone check")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads with --device cpu (default 1: a shared machine thrashes with more)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=None, help="output folder; default $OUT or results/")
    args = parser.parse_args(argv)
    small = args.small
    args.concurrency = [int(c) for c in (args.concurrency or "1,8,32").split(",")]
    args.embed_batches = [int(b) for b in args.embed_batches.split(",")]
    args.prompt_tokens = args.prompt_tokens or (64 if small else 256)
    args.new_tokens = args.new_tokens or (32 if small else 128)
    args.requests_per_worker = args.requests_per_worker or (1 if small else 3)
    args.embed_tokens = args.embed_tokens or (64 if small else 256)
    args.embed_dim = args.embed_dim or (96 if small else 768)
    args.embed_seconds = args.embed_seconds if args.embed_seconds is not None else (0.5 if small else 5.0)
    args.out = args.out or Path(os.environ.get("OUT") or ROOT / "results")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    xgrammar_status = ensure_xgrammar()
    import transformers

    from ragstack.engines.common import resolve_device, resolve_dtype
    from ragstack.engines.generation import InflightBatchingEngine
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    shape = SMALL if args.small else QWEN3_0_6B
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    report = {
        "benchmark": "gpu_engines", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."), "small": args.small,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
                     "xgrammar": xgrammar_status, "apache-tvm-ffi": version("apache-tvm-ffi"),
                     "triton": version("triton") or version("pytorch-triton")},
        "model_shape": {**shape, "tie_word_embeddings": True, "random_init_seed": args.seed,
                        "initializer_range": INITIALIZER_RANGE},
        "settings": {"concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "requests_per_worker": args.requests_per_worker,
                     "greedy": True, "end_id": -1, "embed_batches": args.embed_batches,
                     "embed_tokens": args.embed_tokens, "embed_dim": args.embed_dim,
                     "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None},
    }
    if device.type == "cuda":
        report["cuda"] = {"capability": list(torch.cuda.get_device_capability(device)),
                          "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                          "total_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
    progress(f"device {report['device_name']} ({device}), {report['dtype']}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, xgrammar {xgrammar_status}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_engines_") as tmp:
        folder = Path(tmp) / "generate"
        folder.mkdir()
        progress(f"building a random Qwen3 {shape['num_hidden_layers']}x{shape['hidden_size']} in {folder}")
        report["model"] = build_model_folder(folder, args.tokenizer, shape, args.seed, device, dtype)
        progress(f"model: {report['model']['parameters'] / 1e6:.1f} M parameters, "
                 f"built and saved in {report['model']['build_and_save_s']} s")
        id_limit = min(len(AutoTokenizer.from_pretrained(folder)), shape["vocab_size"])
        report["settings"]["prompt_id_limit"] = id_limit

        # -- generation throughput --
        max_batch = max(args.concurrency)
        t0 = time.perf_counter()
        engine = InflightBatchingEngine(folder, max_batch_size=max_batch, device=device, dtype=dtype)
        report["engine_load_s"] = round(time.perf_counter() - t0, 2)
        try:
            assert engine.model.dtype == dtype and engine.model.device.type == device.type
            progress("warm-up")
            closed_loop(engine, 1, 1, args.prompt_tokens, min(8, args.new_tokens), id_limit, args.seed + 99)
            closed_loop(engine, min(4, max_batch), 1, args.prompt_tokens, min(8, args.new_tokens), id_limit,
                        args.seed + 98)
            generation = {}
            for concurrency in args.concurrency:
                progress(f"generation at concurrency {concurrency} "
                         f"({concurrency * args.requests_per_worker} requests x {args.new_tokens} tokens)")
                run = closed_loop(engine, concurrency, args.requests_per_worker, args.prompt_tokens,
                                  args.new_tokens, id_limit, args.seed + concurrency)
                generation[str(concurrency)] = run
                progress(f"  {run['output_tokens_per_s']} output tokens/s, {run['ms_per_decode_step']} ms/step, "
                         f"mean decode batch {run['mean_decode_batch']}, TTFT p50 {run['ttft_ms']['p50']} ms")
            base = generation[str(args.concurrency[0])]["output_tokens_per_s"]
            report["generation"] = {
                "runs": generation,
                f"ratios_to_concurrency_{args.concurrency[0]}": {
                    c: round(run["output_tokens_per_s"] / base, 2) for c, run in generation.items()},
            }
            progress(f"ratios: {report['generation'][f'ratios_to_concurrency_{args.concurrency[0]}']}")
            progress(f"batched == alone ({report['dtype']})")
            check = batched_vs_alone(engine, id_limit, args.seed + 7)
            report["batched_vs_alone"] = {report["dtype"]: check}
            progress(f"  identical: {check['identical']} "
                     f"{[r['first_difference_at'] for r in check['requests']]}")
        finally:
            engine.shutdown(timeout=60)
            del engine
            free(device)
        if device.type == "cuda":
            report["generation"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if not args.no_fp32_check and dtype != torch.float32:
            progress("batched == alone (float32)")
            engine = InflightBatchingEngine(folder, max_batch_size=4, device=device, dtype=torch.float32)
            try:
                check = batched_vs_alone(engine, id_limit, args.seed + 7)
                report["batched_vs_alone"]["float32"] = check
                progress(f"  identical: {check['identical']} "
                         f"{[r['first_difference_at'] for r in check['requests']]}")
            finally:
                engine.shutdown(timeout=60)
                del engine
                free(device)

        # -- embedding throughput --
        progress("embedding throughput")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report["embedding"] = embedding_throughput(folder, device, dtype, args.embed_batches, args.embed_tokens,
                                                   args.embed_dim, id_limit, args.embed_seconds, args.seed + 5)
        if device.type == "cuda":
            report["embedding"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    report["total_s"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_engines.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {path} in {report['total_s']} s")
    print(json.dumps({"device_name": report["device_name"], "dtype": report["dtype"],
                      "generation_tokens_per_s": {c: r["output_tokens_per_s"]
                                                  for c, r in report["generation"]["runs"].items()},
                      "generation_ratios": report["generation"][f"ratios_to_concurrency_{args.concurrency[0]}"],
                      "batched_equals_alone": {k: v["identical"] for k, v in report["batched_vs_alone"].items()},
                      "embedding_texts_per_s": {b: r["texts_per_s"]
                                                for b, r in report["embedding"]["batches"].items()},
                      "embedding_ratios": report["embedding"][f"ratios_to_batch_{args.embed_batches[0]}"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
