#!/usr/bin/env python3
"""Engine throughput through Triton against the same models in-process (reference profile, CPU).

One run, one process tree: this process starts one tritonserver (embed, embed_text, generate, generate_text
on the demo models) and measures, interleaving the configurations round by round so that the shared machine's
background load hits all of them alike:

* embed: texts/s of `embed_text` at concurrency 16 (gRPC async, one corpus paragraph per request) against
  the same model in this process (EmbedTokenizer + EmbeddingEngine, batches of 16, torch threads 2) and
  against Triton with dynamic batching off (`embed` and `embed_text` reloaded with a config override that
  drops `dynamic_batching`, then restored). Targets: Triton >= 0.9x in-process; >= 3x unbatched.
* generate: total output tokens/s through `generate_text` over a gRPC stream (greedy, fixed max_tokens),
  guided (json_schema, bounded) against unguided, and concurrency 8 against 1.
  Targets: guided >= 0.97x unguided; concurrency 8 >= 3x concurrency 1.
* perf_analyzer once against `embed_text` (benchmarks/perf_data/embed_text.json), its summary line kept.

Writes results/engines.json and results/engines.png. Progress goes to stderr.

  .venv/bin/python benchmarks/engines.py [--clean-rounds 3] [--max-rounds 8] [--segment 6] [--quick]
  .venv/bin/python benchmarks/engines.py --parts generate     # generate only; embed etc. kept from --out

With --parts, the parts not run are carried over from the existing --out file (``carried_over`` names each with
the date of the run that measured it), so that one part can be re-measured without re-running the others.

The machine is shared with other test runs, so every round measures the configurations side by side and the
rounds repeat until each ratio has enough "clean" pairs (other processes under 10% of the CPU in both
segments); the headline ratios come from those, the all-rounds ratios are kept next to them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import admin_headers, pyplot, save_figure  # noqa: E402
from common import (PERF_DATA, RESULTS, ROOT, ClosedLoop, Segment, clean_pairs, corpus_paragraphs,  # noqa: E402
                    display_path, drop_dynamic_batching, latency_summary, machine_info, model_stats, now_iso,
                    paired_ratio, progress, run_perf_analyzer, stats_delta, target, wait_idle,
                    write_embed_text_data, write_json)

from ragstack.contracts import client as client_io  # noqa: E402
from ragstack_dev.server import TritonProcess  # noqa: E402

TORCH_THREADS = 2
EMBED_CONCURRENCY = 16
EMBED_BATCH = 16
GEN_CONCURRENCY = (1, 8)
# Before each round: wait until other processes keep under this fraction of the machine busy (set by main).
IDLE = {"max_fraction": 0.3, "max_wait": 90.0}
# A round's pair of segments is "clean" when other processes took under this share of the CPU in both; rounds
# repeat until every ratio has ROUNDS["clean"] clean pairs, or ROUNDS["max"] rounds, or ROUNDS["budget_s"].
ROUNDS = {"clean": 3, "max": 8, "budget_s": 900.0, "max_other": 0.10}
EMBED_PAIRS = {"triton_vs_in_process": ("triton_batched", "in_process_batched"),
               "batched_vs_unbatched": ("triton_batched", "triton_unbatched"),
               "in_process_batch16_vs_batch1": ("in_process_batched", "in_process_batch1")}
GEN_PAIRS = {"guided_vs_unguided_c1": ("guided_c1", "unguided_c1"),
             "guided_vs_unguided_c8": ("guided_c8", "unguided_c8"),
             "c8_vs_c1_unguided": ("unguided_c8", "unguided_c1"),
             "c8_vs_c1_guided": ("guided_c8", "guided_c1")}


def enough_clean(per: dict, pairs: dict, started: float, rounds_done: int) -> bool:
    if rounds_done >= ROUNDS["max"] or time.time() - started > ROUNDS["budget_s"]:
        return True
    return all(clean_pairs(per, a, b, ROUNDS["max_other"]) >= ROUNDS["clean"] for a, b in pairs.values())
# A bounded schema: decoding cannot run away, and the summary is long enough that 48 tokens never finish it.
GUIDE_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "minLength": 200, "maxLength": 800},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 5},
    },
    "required": ["summary", "keywords"],
    "additionalProperties": False,
}
# Asks for a long answer, so that unguided decoding does not stop before max_tokens either: both sides then
# generate the same number of tokens per request (finish reasons are recorded to check it).
GEN_PROMPT = ("Write a detailed summary of the following passage in at least eight sentences, then list its "
              "key terms.\n\nPassage: {text}")


# ------------------------------------------------------------------------------------------------ embed
class TritonEmbed:
    """One paragraph per request through embed_text, gRPC async."""

    def __init__(self, grpc_url: str, texts: list):
        import tritonclient.grpc as grpcclient

        self.mod = grpcclient
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.texts = texts
        self.outputs = [grpcclient.InferRequestedOutput("embedding")]

    def submit(self, i, done):
        inputs = client_io.infer_inputs(self.mod, "embed_text", {"text": self.texts[i % len(self.texts)]})
        self.client.async_infer("embed_text", inputs, outputs=self.outputs,
                                callback=lambda result, error: done(error is None, error))

    def run(self, seconds: float, start: int) -> dict:
        return ClosedLoop(self.submit, EMBED_CONCURRENCY).run(duration=seconds, start_index=start)


class InProcessEmbed:
    """The same tokenizer and model in this process, torch threads 2, ``batch`` consecutive texts per call."""

    def __init__(self, engine_dir: Path, texts: list, batch: int = EMBED_BATCH):
        import torch

        from ragstack.engines.embedding import EmbeddingEngine
        from ragstack.tokenization.retrieval import EmbedTokenizer

        torch.set_num_threads(TORCH_THREADS)
        self.tokenizer = EmbedTokenizer(engine_dir)
        self.engine = EmbeddingEngine(engine_dir, num_threads=TORCH_THREADS)
        self.texts = texts
        self.batch = batch

    def with_batch(self, batch: int) -> "InProcessEmbed":
        clone = object.__new__(InProcessEmbed)
        clone.__dict__.update(self.__dict__, batch=batch)
        return clone

    def run(self, seconds: float, start: int) -> dict:
        t0 = time.perf_counter()
        n, i, lat, real, padded = 0, start, [], 0, 0
        while time.perf_counter() - t0 < seconds:
            batch = [self.texts[(i + k) % len(self.texts)] for k in range(self.batch)]
            tb = time.perf_counter()
            ids, mask, _ = self.tokenizer.encode(batch, "document")
            self.engine(ids, mask)
            lat.append(time.perf_counter() - tb)
            real += int(mask.sum())
            padded += int(mask.size)
            n += self.batch
            i += self.batch
        return {"requests": len(lat), "ok": n, "n_errors": 0, "errors": [], "elapsed_s": time.perf_counter() - t0,
                "latency_ms": latency_summary(lat), "next_index": i,
                "tokens": {"real": real, "padded": padded, "padding_fraction": round(1 - real / max(1, padded), 3)}}


def set_batching(http_client, enabled: bool, originals: dict) -> None:
    """Reload embed and embed_text with (enabled) their repository configs or (disabled) a config override
    without dynamic_batching."""
    for model in ("embed", "embed_text"):
        # A plain load of an unchanged, loaded model is a no-op in Triton: restore with the original config.
        cfg = originals[model] if enabled else drop_dynamic_batching(originals[model])
        http_client.load_model(model, config=json.dumps(cfg), headers=admin_headers())
        cfg = http_client.get_model_config(model, headers=admin_headers())
        if ("dynamic_batching" in cfg) != enabled:
            raise RuntimeError(f"{model}: dynamic_batching {'missing' if enabled else 'still present'} after reload")


def bench_embed(server: TritonProcess, engine_dir: Path, segment: float, warmup: float) -> dict:
    import tritonclient.http as httpclient

    texts = corpus_paragraphs()
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=300, connection_timeout=300)
    originals = {m: http.get_model_config(m, headers=admin_headers()) for m in ("embed", "embed_text")}
    triton = TritonEmbed(server.grpc_url, texts)
    progress("embed: loading the in-process tokenizer and model")
    local = InProcessEmbed(engine_dir, texts)
    server_pid = server.proc.pid

    local1 = local.with_batch(1)
    per = {"triton_batched": [], "in_process_batched": [], "triton_unbatched": [], "in_process_batch1": []}
    batching = {"triton_batched": [], "triton_unbatched": []}
    index = 0
    # warm everything once (first-call costs are not throughput)
    triton.run(warmup, 0)
    local.run(warmup, 0)

    def measure(name, runner):
        nonlocal index
        models = ("embed", "embed_text")
        before = model_stats(http, models) if name.startswith("triton") else None
        with Segment(server_pid) as seg:
            r = runner.run(segment, index)
        index = r["next_index"]
        if r["n_errors"]:
            raise RuntimeError(f"embed {name}: {r['n_errors']} failed requests, e.g. {r['errors'][:1]}")
        rec = {"texts": r["ok"], "elapsed_s": round(r["elapsed_s"], 3),
               "texts_per_s": round(r["ok"] / r["elapsed_s"], 2), "latency_ms": r["latency_ms"], **seg.as_dict()}
        if "tokens" in r:
            rec["tokens"] = r["tokens"]
        if before is not None:
            d = stats_delta(before, model_stats(http, models))
            rec["avg_batch"] = {m: round(d[m]["inference_count"] / max(1, d[m]["execution_count"]), 2)
                                for m in models}
            batching[name].append(rec["avg_batch"])
        per[name].append(rec)
        progress(f"embed round {rnd + 1} {name}: {rec['texts_per_s']} texts/s "
                 f"(machine busy {rec['machine_busy_fraction']:.0%}, other processes {rec['cpu_s_other_processes']} "
                 f"cpu-s){' avg batch ' + str(rec.get('avg_batch')) if 'avg_batch' in rec else ''}")

    idle = []
    started, rnd = time.time(), 0
    while True:
        idle.append(wait_idle(**IDLE))
        # alternate the order between rounds so that neither side always runs first
        if rnd % 2 == 0:
            measure("triton_batched", triton)
            measure("in_process_batched", local)
            measure("in_process_batch1", local1)
        else:
            measure("in_process_batch1", local1)
            measure("in_process_batched", local)
            measure("triton_batched", triton)
        progress("embed: reloading embed and embed_text without dynamic_batching")
        set_batching(http, False, originals)
        triton.run(warmup, index)
        measure("triton_unbatched", triton)
        set_batching(http, True, originals)
        triton.run(warmup, index)
        rnd += 1
        if enough_clean(per, EMBED_PAIRS, started, rnd):
            break
        progress(f"embed: clean pairs so far "
                 f"{ {k: clean_pairs(per, a, b, ROUNDS['max_other']) for k, (a, b) in EMBED_PAIRS.items()} }")
    rounds = rnd
    progress("embed: padding diagnostic (in-process batch 16, corpus order against length-sorted batches)")
    diagnostic = padding_diagnostic(local, segment, server_pid)

    def total(name):
        recs = per[name]
        return round(sum(r["texts"] for r in recs) / sum(r["elapsed_s"] for r in recs), 2)
    return {
        "texts": {"source": "data/corpus/*.md paragraphs", "count": len(texts),
                  "mean_words": round(statistics.mean(len(t.split()) for t in texts), 1),
                  "max_words": max(len(t.split()) for t in texts)},
        "settings": {"concurrency": EMBED_CONCURRENCY, "in_process_batch": EMBED_BATCH,
                     "torch_threads": TORCH_THREADS, "rounds": rounds, "segment_s": segment,
                     "in_process_batch1": "diagnostic: the same in-process model one text per call (what "
                                          "batching itself buys on this CPU, with no server involved)",
                     "client": "tritonclient.grpc async_infer, one text per request",
                     "unbatched": "embed and embed_text reloaded with config overrides without dynamic_batching "
                                  "(embed_text also batches: dropping it from embed alone would leave the "
                                  "BLS model sending multi-row batches)"},
        "texts_per_s_all_rounds": {name: total(name) for name in per},
        "ratios": {k: paired_ratio(per, a, b, "texts", ROUNDS["max_other"]) for k, (a, b) in EMBED_PAIRS.items()},
        "padding_diagnostic": diagnostic,
        "per_round": per,
        "idle_before_round": idle,
    }


def padding_diagnostic(local: InProcessEmbed, segment: float, server_pid: int, rounds: int = 2) -> dict:
    """What batching can buy on this CPU once padding is out of the way: the in-process model at batch 16 over
    the texts in corpus order (each batch padded to its longest text) against the same texts sorted by length
    (batches of similar lengths), and at batch 1. Alternated, side by side."""
    lengths = [int(n) for n in local.tokenizer.encode(local.texts, "document")[2]]
    order = sorted(range(len(local.texts)), key=lambda i: lengths[i])
    sorted_runner = local.with_batch(EMBED_BATCH)
    sorted_runner.texts = [local.texts[i] for i in order]
    runners = {"batch16_corpus_order": local, "batch16_length_sorted": sorted_runner,
               "batch1": local.with_batch(1)}
    per = {name: [] for name in runners}
    for _ in range(rounds):
        wait_idle(**IDLE)
        for name, runner in runners.items():
            with Segment(server_pid) as seg:
                r = runner.run(segment, 0)
            per[name].append({"texts": r["ok"], "elapsed_s": round(r["elapsed_s"], 3),
                              "texts_per_s": round(r["ok"] / r["elapsed_s"], 2), "tokens": r["tokens"],
                              "real_tokens_per_s": round(r["tokens"]["real"] / r["elapsed_s"], 1),
                              "padded_tokens_per_s": round(r["tokens"]["padded"] / r["elapsed_s"], 1),
                              **seg.as_dict()})
            progress(f"embed diagnostic {name}: {per[name][-1]['texts_per_s']} texts/s, padding "
                     f"{r['tokens']['padding_fraction']:.0%}, other processes {seg.as_dict()['cpu_s_other_processes']} cpu-s")
    return {"per_round": per,
            "ratios": {"length_sorted_vs_corpus_order": paired_ratio(per, "batch16_length_sorted",
                                                                     "batch16_corpus_order", "texts",
                                                                     ROUNDS["max_other"]),
                       "length_sorted_batch16_vs_batch1": paired_ratio(per, "batch16_length_sorted", "batch1",
                                                                       "texts", ROUNDS["max_other"])},
            "token_lengths": {"mean": round(statistics.mean(lengths), 1), "max": max(lengths),
                              "min": min(lengths)}}


# --------------------------------------------------------------------------------------------- generate
class StreamGenerate:
    """generate_text over one gRPC stream; each request gets exactly one final response (stream=False)."""

    def __init__(self, grpc_url: str, prompts: list, max_tokens: int):
        import tritonclient.grpc as grpcclient

        self.mod = grpcclient
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.pending: dict = {}
        self.lock = threading.Lock()
        self.client.start_stream(callback=self._on_response)

    def close(self):
        self.client.stop_stream()

    def _on_response(self, result, error):
        if error is not None:
            with self.lock:   # an error response carries no id: fail the oldest outstanding request
                key = next(iter(self.pending), None)
                done = self.pending.pop(key, None)
            if done:
                done(False, error)
            return
        rid = result.get_response().id
        with self.lock:
            done = self.pending.pop(rid, None)
        if done is None:
            return
        n_out = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        n_in = int(result.as_numpy("num_input_tokens").reshape(-1)[0])
        reason = client_io.output_string(result, "finish_reason")
        done(True, {"out": n_out, "in": n_in, "finish": reason})

    def submitter(self, guided: bool):
        def submit(i, done):
            values = {"prompt": self.prompts[i % len(self.prompts)], "max_tokens": self.max_tokens,
                      "temperature": 0.0, "stream": False}
            if guided:
                values.update(guide_type="json_schema", guide=json.dumps(GUIDE_SCHEMA))
            inputs = client_io.infer_inputs(self.mod, "generate_text", values)
            rid = f"r{i}"
            with self.lock:
                self.pending[rid] = done
            self.client.async_stream_infer("generate_text", inputs, request_id=rid)
        return submit


def bench_generate(server: TritonProcess, max_tokens: int, counts: dict) -> dict:
    texts = corpus_paragraphs()
    prompts = [GEN_PROMPT.format(text=t) for t in texts[::3]]
    gen = StreamGenerate(server.grpc_url, prompts, max_tokens)
    configs = [(g, c) for c in GEN_CONCURRENCY for g in (False, True)]
    per = {f"{'guided' if g else 'unguided'}_c{c}": [] for g, c in configs}
    try:
        progress("generate: warm-up (compiles the schema's grammar once)")
        ClosedLoop(gen.submitter(True), 2).run(count=2)
        ClosedLoop(gen.submitter(False), 2).run(count=2)
        index = 0
        idle = []
        started, rnd = time.time(), 0
        while True:
            idle.append(wait_idle(**IDLE))
            # alternate the order between rounds so neither side always runs first
            order = configs if rnd % 2 == 0 else list(reversed(configs))
            for guided, conc in order:
                name = f"{'guided' if guided else 'unguided'}_c{conc}"
                with Segment(server.proc.pid) as seg:
                    r = ClosedLoop(gen.submitter(guided), conc).run(count=counts[conc], start_index=index)
                if r["n_errors"]:
                    raise RuntimeError(f"generate {name}: {r['n_errors']} failed, e.g. {r['errors'][:1]}")
                vals = r["values"]
                tokens = sum(v["out"] for v in vals)
                finishes = {}
                for v in vals:
                    finishes[v["finish"]] = finishes.get(v["finish"], 0) + 1
                rec = {"requests": len(vals), "output_tokens": tokens, "elapsed_s": round(r["elapsed_s"], 3),
                       "tokens_per_s": round(tokens / r["elapsed_s"], 2),
                       "mean_input_tokens": round(statistics.mean(v["in"] for v in vals), 1),
                       "finish_reasons": finishes, "latency_ms": r["latency_ms"], **seg.as_dict()}
                per[name].append(rec)
                progress(f"generate round {rnd + 1} {name}: {rec['tokens_per_s']} tok/s, "
                         f"{tokens} tokens in {rec['elapsed_s']} s, finish {finishes} "
                         f"(machine busy {rec['machine_busy_fraction']:.0%}, other processes "
                         f"{rec['cpu_s_other_processes']} cpu-s)")
            index += max(counts.values())   # each config of a round saw the same prompts
            rnd += 1
            if enough_clean(per, GEN_PAIRS, started, rnd):
                break
            progress(f"generate: clean pairs so far "
                     f"{ {k: clean_pairs(per, a, b, ROUNDS['max_other']) for k, (a, b) in GEN_PAIRS.items()} }")
        rounds = rnd
    finally:
        gen.close()

    def total(name):
        recs = per[name]
        return round(sum(r["output_tokens"] for r in recs) / sum(r["elapsed_s"] for r in recs), 2)

    return {
        "settings": {"model_path": "generate_text (BLS) -> generate (decoupled, in-flight batching)",
                     "client": "tritonclient.grpc start_stream + async_stream_infer, stream=False (one final "
                               "response per request)", "temperature": 0.0, "max_tokens": max_tokens,
                     "requests_per_segment": {f"c{c}": counts[c] for c in GEN_CONCURRENCY},
                     "rounds": rounds, "prompts": len(prompts), "prompt_template": GEN_PROMPT,
                     "guide_type": "json_schema", "guide": GUIDE_SCHEMA,
                     "tokens_counted_from": "num_output_tokens"},
        "tokens_per_s_all_rounds": {name: total(name) for name in per},
        "ratios": {k: paired_ratio(per, a, b, "output_tokens", ROUNDS["max_other"]) for k, (a, b) in GEN_PAIRS.items()},
        "per_round": per,
        "idle_before_round": idle,
    }


# ------------------------------------------------------------------------------------------------ plot
def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    t = result["targets"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    er = result["embed"]["ratios"]

    def clean_rate(ratios, key, name):
        """throughput of one configuration over the rounds its headline ratio was computed from"""
        r = ratios[key]
        part = r["clean_rounds"] if r["clean_rounds"]["n"] else r["all_rounds"]
        return part[f"{name}_per_s"]
    names = ["Triton c16\n(dyn. batching)", "in-process\nbatch 16", "Triton c16\nno batching",
             "in-process\nbatch 1 (diag.)"]
    vals = [clean_rate(er, "triton_vs_in_process", "triton_batched"),
            clean_rate(er, "triton_vs_in_process", "in_process_batched"),
            clean_rate(er, "batched_vs_unbatched", "triton_unbatched"),
            clean_rate(er, "in_process_batch16_vs_batch1", "in_process_batch1")]
    ax = axes[0]
    ax.bar(names, vals, color=["#4c72b0", "#999999", "#dd8452", "#cccccc"])
    for x, v in enumerate(vals):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_title(f"embed (all-MiniLM-L6-v2, corpus paragraphs): texts/s\n"
                 f"Triton / in-process {t['embed_triton_vs_in_process']['value']:.2f}x (target >= 0.9), "
                 f"batched / unbatched {t['embed_batched_vs_unbatched']['value']:.2f}x (target >= 3)", fontsize=9)
    ax.set_ylabel("texts/s")
    gr = result["generate"]["ratios"]
    names = ["unguided\nc1", "guided\nc1", "unguided\nc8", "guided\nc8"]
    vals = [clean_rate(gr, "guided_vs_unguided_c1", "unguided_c1"), clean_rate(gr, "guided_vs_unguided_c1", "guided_c1"),
            clean_rate(gr, "guided_vs_unguided_c8", "unguided_c8"), clean_rate(gr, "guided_vs_unguided_c8", "guided_c8")]
    ax = axes[1]
    ax.bar(names, vals, color=["#4c72b0", "#55a868", "#4c72b0", "#55a868"])
    for x, v in enumerate(vals):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_title(f"generate (SmolLM2-135M, greedy, {result['generate']['settings']['max_tokens']} tokens): "
                 f"output tokens/s\nguided / unguided {t['generate_guided_vs_unguided_c1']['value']:.2f}x (c1), "
                 f"{t['generate_guided_vs_unguided_c8']['value']:.2f}x (c8) (target >= 0.97); "
                 f"c8 / c1 {t['generate_c8_vs_c1_unguided']['value']:.2f}x (target >= 3)", fontsize=9)
    ax.set_ylabel("tokens/s")
    fig.suptitle(f"Triton 2.51 reference profile on CPU ({result['machine']['nproc']} cores, shared machine; "
                 f"rounds where other processes used < {ROUNDS['max_other']:.0%} CPU), {result['date'][:10]}",
                 fontsize=10)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- main
TARGETS = {  # name: (part, ratio key, goal)
    "embed_triton_vs_in_process": ("embed", "triton_vs_in_process", 0.9),
    "embed_batched_vs_unbatched": ("embed", "batched_vs_unbatched", 3.0),
    "generate_guided_vs_unguided_c1": ("generate", "guided_vs_unguided_c1", 0.97),
    "generate_guided_vs_unguided_c8": ("generate", "guided_vs_unguided_c8", 0.97),
    "generate_c8_vs_c1_unguided": ("generate", "c8_vs_c1_unguided", 3.0),
    "generate_c8_vs_c1_guided": ("generate", "c8_vs_c1_guided", 3.0),
}


PARTS = ("embed", "generate", "perf_analyzer")
SERVED = {"embed": "embed embed_text", "generate": "generate generate_text", "perf_analyzer": "embed embed_text"}


def parse_parts(text: str) -> list:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"--parts: choose from {', '.join(PARTS)} (got {text!r})")
    return [p for p in PARTS if p in parts]


def carry_over(result: dict, out: Path, parts: list) -> None:
    """Copy the parts not run now from the file this run replaces, noting when each was measured."""
    if not out.is_file():
        return
    old = json.loads(out.read_text())
    for part in PARTS:
        if part in parts or part not in old:
            continue
        result[part] = old[part]
        result.setdefault("carried_over", {})[part] = old.get("carried_over", {}).get(part, old.get("date"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=parse_parts, default=list(PARTS),
                    help="comma-separated parts to measure: embed, generate, perf_analyzer (default all); the "
                         "others are kept from the existing --out file")
    ap.add_argument("--models", type=Path, default=ROOT / "build" / "models" / "demo")
    ap.add_argument("--segment", type=float, default=6.0, help="seconds per embed configuration per round")
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--clean-rounds", type=int, default=3,
                    help="repeat rounds until every ratio has this many clean side-by-side pairs ...")
    ap.add_argument("--max-rounds", type=int, default=8, help="... or this many rounds (per part)")
    ap.add_argument("--budget", type=float, default=900.0, help="... or this many seconds (per part)")
    ap.add_argument("--max-other", type=float, default=0.10,
                    help="a segment is clean when other processes used under this share of the CPU")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--c1-requests", type=int, default=3, help="requests per concurrency-1 segment")
    ap.add_argument("--c8-requests", type=int, default=16, help="requests per concurrency-8 segment")
    ap.add_argument("--no-perf-analyzer", action="store_true", help="the same as leaving it out of --parts")
    ap.add_argument("--idle-fraction", type=float, default=0.3,
                    help="before the run and each round, wait until other processes keep under this fraction "
                         "of the machine busy (the machine is shared)")
    ap.add_argument("--idle-wait", type=float, default=90.0, help="longest wait per round, seconds")
    ap.add_argument("--start-wait", type=float, default=600.0, help="longest wait before starting, seconds")
    ap.add_argument("--quick", action="store_true", help="smoke run: one short round each")
    ap.add_argument("--out", type=Path, default=RESULTS / "engines.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "engines.png")
    args = ap.parse_args()
    if args.quick:
        args.max_rounds, args.segment, args.c1_requests, args.c8_requests = 1, 3.0, 1, 8
        args.max_tokens = min(args.max_tokens, 16)
    IDLE.update(max_fraction=args.idle_fraction, max_wait=args.idle_wait)
    ROUNDS.update(clean=args.clean_rounds, max=args.max_rounds, budget_s=args.budget, max_other=args.max_other)

    parts = [p for p in args.parts if not (p == "perf_analyzer" and args.no_perf_analyzer)]
    quiet = wait_idle(args.idle_fraction, args.start_wait)
    started = time.time()
    result = {"benchmark": "engines", "date": now_iso(), "machine": machine_info(TORCH_THREADS),
              "start_condition": quiet, "models": display_path(args.models), "parts_measured": parts,
              "method": {"interleaving": "every round measures each configuration side by side (order alternating); "
                                         "ratios compare the segments of the same round",
                         "clean_round": f"other processes used under {args.max_other:.0%} of the CPU in both "
                                        "segments of a pair (the machine is shared with other test runs)",
                         "stop_rule": f"rounds repeat until each ratio has {args.clean_rounds} clean pairs, or "
                                      f"{args.max_rounds} rounds, or {args.budget:.0f} s per part",
                         "headline": "value = ratio of totals (sum of work / sum of time) over the clean pairs; "
                                     "all-rounds numbers are kept next to it"}}
    log_path = ROOT / "build" / "logs" / "bench-engines.log"
    progress(f"starting tritonserver (log {display_path(log_path)})")
    # engines measured directly: the operator opens them (RAG_DIRECT_MODELS, ragstack.governance.access)
    served = " ".join(dict.fromkeys(" ".join(SERVED[p] for p in parts).split()))
    server = TritonProcess(args.models, load_models=served, log_path=log_path, env={"RAG_DIRECT_MODELS": "*"})
    server.start()
    try:
        progress(f"server ready: http {server.http_url} grpc {server.grpc_url}")
        if "embed" in parts:
            result["embed"] = bench_embed(server, args.models / "embed", args.segment, args.warmup)
        if "generate" in parts:
            result["generate"] = bench_generate(server, args.max_tokens, {1: args.c1_requests, 8: args.c8_requests})
        if "perf_analyzer" in parts:
            write_embed_text_data(PERF_DATA / "embed_text.json")   # in step with the corpus
            wait_idle(**IDLE)
            progress("perf_analyzer against embed_text")
            pa_args = ["-m", "embed_text", "-i", "grpc", "-u", server.grpc_url,
                       "--input-data", str((PERF_DATA / "embed_text.json").relative_to(ROOT)),
                       "--concurrency-range", str(EMBED_CONCURRENCY), "--measurement-interval",
                       "5000" if args.quick else "10000", "--max-trials", "6"]
            # -s: stability threshold. The shared machine often defeats a strict one; then retry leniently.
            pa = run_perf_analyzer(pa_args + ["-s", "30"], timeout=240)
            if not pa.get("summary"):
                progress("perf_analyzer: no stable measurement at -s 30; retrying with -s 100")
                pa = {**run_perf_analyzer(pa_args + ["-s", "100"], timeout=300),
                      "first_attempt": {k: pa.get(k) for k in ("command", "rc", "tail")}}
            result["perf_analyzer"] = pa
            progress(f"perf_analyzer: {pa.get('summary') or pa.get('error') or pa.get('tail', '')[-300:]}")
    finally:
        server.stop()

    carry_over(result, args.out, parts)
    result["targets"] = {}
    for name, (part, key, goal) in TARGETS.items():
        if part not in result:
            continue
        r = result[part]["ratios"][key]
        result["targets"][name] = {**target(r["value"], goal), "basis": r["basis"],
                                   "all_rounds_ratio": r["all_rounds"].get("ratio_of_totals"),
                                   "all_rounds_median": r["all_rounds"].get("median_of_rounds")}
    result["all_pass"] = all(t["pass"] for t in result["targets"].values())
    result["wall_s"] = round(time.time() - started, 1)
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    write_json(args.out, result)
    if "embed" in result and "generate" in result:
        plot(result, args.plot)
    else:
        progress("embed or generate figures missing (not measured, nothing to carry over): no plot")
    for name, t in result["targets"].items():
        progress(f"{name}: {t['value']} (target {t['target']}; {t['basis']}; all rounds {t['all_rounds_ratio']}) "
                 f"{'PASS' if t['pass'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
