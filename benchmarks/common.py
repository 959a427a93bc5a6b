"""Helpers shared by the benchmarks: texts, machine facts, load drivers, Triton statistics, perf_analyzer."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ragstack_dev.server import progress  # noqa: E402,F401 - re-exported

RESULTS = ROOT / "results"
PERF_DATA = ROOT / "benchmarks" / "perf_data"
VENV = ROOT / ".venv"
PERF_ANALYZER = VENV / "bin" / "perf_analyzer"
CUDART_LIB = VENV / "lib" / "python3.11" / "site-packages" / "nvidia" / "cuda_runtime" / "lib"


# ------------------------------------------------------------------------------------------------- texts
def corpus_paragraphs(min_words: int = 12) -> list[str]:
    """The bundled corpus as paragraphs (what a document chunk looks like): blank-line separated blocks,
    headings, tables and code fences dropped, lines joined. Sorted by file name: deterministic."""
    paragraphs = []
    for path in sorted((ROOT / "data" / "corpus").glob("*.md")):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            lines = [ln.strip() for ln in block.strip().splitlines()]
            if not lines or lines[0].startswith(("#", "|", "```")):
                continue
            text = " ".join(ln.lstrip("-* ").strip() for ln in lines)
            if len(text.split()) >= min_words:
                paragraphs.append(text)
    return paragraphs


def eval_questions() -> list[str]:
    data = json.loads((ROOT / "data" / "retrieval_eval.json").read_text(encoding="utf-8"))
    return [q["question"] for q in data["questions"]]


# ------------------------------------------------------------------------------------------ machine facts
def machine_info(torch_threads: Optional[int] = None) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    info = {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": mem_gib, "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg())}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch_threads if torch_threads is not None else torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    progress(f"wrote {display_path(path)}")


def display_path(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def target(value: float, goal: float, kind: str = ">=") -> dict:
    """A ratio (or an absolute number) against its target, with pass/fail."""
    ok = value >= goal if kind == ">=" else value < goal
    return {"value": round(value, 4), "target": f"{kind} {goal}", "pass": bool(ok)}


# ------------------------------------------------------------------------------------------- load drivers
class ClosedLoop:
    """Keeps ``concurrency`` requests in flight for ``duration`` seconds (or ``count`` requests).

    ``submit(i, done)`` must start request ``i`` asynchronously and call ``done(ok, value)`` exactly once when
    it ends (from any thread). A request that completes counts if it was *started* before the deadline; the
    elapsed time runs from the first start to the last completion, so nothing in flight is dropped.
    """

    def __init__(self, submit: Callable, concurrency: int):
        self.submit = submit
        self.concurrency = concurrency

    def run(self, duration: Optional[float] = None, count: Optional[int] = None, start_index: int = 0,
            timeout: float = 900.0) -> dict:
        assert (duration is None) != (count is None)
        slots = threading.Semaphore(self.concurrency)
        lock = threading.Lock()
        all_done = threading.Event()
        state = {"started": 0, "finished": 0, "ok": 0, "errors": [], "values": [], "latencies": [],
                 "closed": False}

        def make_done(t_start):
            def done(ok, value=None):
                t_end = time.perf_counter()
                with lock:
                    state["finished"] += 1
                    state["latencies"].append(t_end - t_start)
                    if ok:
                        state["ok"] += 1
                        state["values"].append(value)
                    else:
                        state["errors"].append(str(value)[:500])
                    state["t_last"] = t_end
                    if state["closed"] and state["finished"] == state["started"]:
                        all_done.set()
                slots.release()
            return done

        t0 = time.perf_counter()
        deadline = t0 + duration if duration is not None else None
        i = start_index
        while True:
            if count is not None and state["started"] >= count:
                break
            if not slots.acquire(timeout=timeout):
                raise TimeoutError("no request completed within the timeout")
            if deadline is not None and time.perf_counter() >= deadline:
                slots.release()
                break
            with lock:
                state["started"] += 1
            ts = time.perf_counter()
            try:
                self.submit(i, make_done(ts))
            except Exception as e:  # noqa: BLE001 - a failed submit is a failed request
                make_done(ts)(False, e)
            i += 1
        with lock:
            state["closed"] = True
            if state["finished"] == state["started"]:
                all_done.set()
        if not all_done.wait(timeout):
            raise TimeoutError(f"{state['started'] - state['finished']} requests still in flight after {timeout}s")
        elapsed = state.get("t_last", time.perf_counter()) - t0
        lat = sorted(state["latencies"])
        return {"requests": state["started"], "ok": state["ok"], "errors": state["errors"][:5],
                "n_errors": len(state["errors"]), "elapsed_s": elapsed, "values": state["values"],
                "latency_ms": latency_summary(lat), "next_index": i}


def latency_summary(seconds: list) -> dict:
    if not seconds:
        return {}
    s = sorted(seconds)

    def pct(q):
        return round(1000 * s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 2)
    return {"mean": round(1000 * sum(s) / len(s), 2), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "max": round(1000 * s[-1], 2), "n": len(s)}


# ----------------------------------------------------------------------------------------- Triton helpers
def admin_key() -> str:
    """The admin key: $RAG_ADMIN_KEY or $RAG_ADMIN_KEY_FILE (a server we attach to), else the key of the servers this
    process starts (ragstack_dev.server.access_keys)."""
    from ragstack.lifecycle.client import env_key
    from ragstack_dev.server import access_keys

    return env_key("RAG_ADMIN_KEY") or access_keys().admin_key


def key_headers() -> dict:
    """X-Api-Key with the admin key (ingest, model_manager ops; ragstack.governance.access)."""
    return {"x-api-key": admin_key()}


def admin_headers() -> dict:
    """Triton's restricted APIs (repository, model config, statistics) over HTTP."""
    return {"admin-key": admin_key()}


def operator_headers(attached: bool = False) -> dict:
    """What reaches an internal model directly (e.g. vector_index for a check): the admin key and the internal proof
    of the servers this process starts; ``attached``: of the server we attach to, from its RAG_INTERNAL_SECRET_FILE
    (none given: no proof is sent, and the server must open the model with RAG_DIRECT_MODELS)."""
    from ragstack.governance.access import INTERNAL_HEADER
    from ragstack.lifecycle.client import env_key
    from ragstack_dev.server import access_keys

    if not attached:
        return access_keys().headers()
    secret = env_key("RAG_INTERNAL_SECRET")
    return {"x-api-key": admin_key(), **({INTERNAL_HEADER: secret} if secret else {})}


def identity_headers(models: Path) -> dict:
    """The engine identity headers (the policy rejects a request without them) for the served generator, from its build manifest (as tools/rag_client.py);
    lower case, as gRPC metadata must be."""
    from ragstack.governance.manifest import read_manifest

    return {k.lower(): v for k, v in read_manifest(models / "generate").headers().items()}


def ingest_corpus(http_url: str, collection: str = "default") -> dict:
    """data/corpus through the `ingest` model, one document per request (as tools/rag_client.py sends it)."""
    import tritonclient.http as httpclient

    from ragstack.contracts import client as client_io

    client = httpclient.InferenceServerClient(http_url, network_timeout=600, connection_timeout=600)
    paths = sorted(p for p in (ROOT / "data" / "corpus").rglob("*") if p.suffix in (".md", ".txt"))
    t0 = time.perf_counter()
    docs = []
    try:
        for path in paths:
            values = {"doc_ids": [path.stem], "texts": [path.read_text(encoding="utf-8")], "collection": collection,
                      "metadata": [json.dumps({"source": str(path.relative_to(ROOT)), "title": path.stem})]}
            result = client.infer("ingest", client_io.infer_inputs(httpclient, "ingest", values), headers=key_headers())
            doc = client_io.output_json(result, "report")["documents"][0]
            docs.append({"doc_id": path.stem, "status": doc["status"], "chunks": doc["chunks"]})
    finally:
        client.close()
    return {"collection": collection, "documents": len(docs), "chunks": sum(d["chunks"] for d in docs),
            "seconds": round(time.perf_counter() - t0, 2), "per_document": docs}


def model_stats(client, models) -> dict:
    """Cumulative per-model statistics from a tritonclient.http client: counts and ns totals."""
    out = {}
    for model in models:
        raw = client.get_inference_statistics(model, headers=admin_headers())
        agg = {"inference_count": 0, "execution_count": 0, "success_count": 0, "success_ns": 0, "queue_ns": 0,
               "compute_input_ns": 0, "compute_infer_ns": 0, "compute_output_ns": 0}
        for ms in raw.get("model_stats", []):
            agg["inference_count"] += int(ms.get("inference_count", 0))
            agg["execution_count"] += int(ms.get("execution_count", 0))
            st = ms.get("inference_stats", {})
            agg["success_count"] += int(st.get("success", {}).get("count", 0))
            agg["success_ns"] += int(st.get("success", {}).get("ns", 0))
            for key in ("queue", "compute_input", "compute_infer", "compute_output"):
                agg[f"{key}_ns"] += int(st.get(key, {}).get("ns", 0))
        out[model] = agg
    return out


def stats_delta(before: dict, after: dict) -> dict:
    return {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after}


def drop_dynamic_batching(config: dict) -> dict:
    cfg = json.loads(json.dumps(config))
    cfg.pop("dynamic_batching", None)
    return cfg


# ------------------------------------------------------------------------------------------ perf_analyzer
def perf_analyzer_env() -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{CUDART_LIB}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") \
        else str(CUDART_LIB)
    return env


def perf_analyzer_command(args: list) -> list:
    return [str(PERF_ANALYZER), *args]


def run_perf_analyzer(args: list, timeout: float = 300.0) -> dict:
    """Run perf_analyzer once; returns the command, rc, the summary lines and the output's tail."""
    cmd = perf_analyzer_command(args)
    shown = f"LD_LIBRARY_PATH={CUDART_LIB.relative_to(ROOT)} {PERF_ANALYZER.relative_to(ROOT)} " + " ".join(args)
    if not PERF_ANALYZER.exists():
        return {"command": shown, "ran": False, "error": f"{PERF_ANALYZER} not found"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=perf_analyzer_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"command": shown, "ran": False, "error": f"timed out after {timeout}s", "tail": out[-2000:]}
    out = proc.stdout + proc.stderr
    summary = [ln.strip() for ln in out.splitlines() if re.match(r"\s*(Concurrency|Request concurrency): \d+, "
                                                                  r"throughput", ln)]
    result = {"command": shown, "ran": True, "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
              "summary": summary, "tail": out[-2500:]}
    m = re.search(r"throughput: ([\d.]+) infer/sec, latency (\d+) usec", " ".join(summary))
    if m:
        result["throughput_infer_per_s"] = float(m.group(1))
        result["latency_avg_us"] = int(m.group(2))
    return result


def write_input_data(path: Path, entries: list) -> None:
    """A perf_analyzer --input-data JSON file, one request's tensors per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in entries)
    path.write_text('{"data": [\n' + body + "\n]}\n", encoding="utf-8")


def write_embed_text_data(path: Path) -> None:
    """perf_analyzer input data for embed_text: one corpus paragraph per request (shape [1]: embed_text
    batches, so the batch dimension is left out; perf_analyzer adds it, -b 1 by default)."""
    write_input_data(path, [{"text": {"content": [t], "shape": [1]}} for t in corpus_paragraphs()])


def which(name: str) -> Optional[str]:
    return shutil.which(name)


def wait_for_quiet(threshold: float, max_wait: float) -> dict:
    """The machine is shared: wait (up to ``max_wait`` s) until the 1-minute load average is under
    ``threshold``, so that a benchmark does not start in the middle of someone else's test run."""
    t0 = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - t0 < max_wait:
        progress(f"load average {os.getloadavg()[0]:.2f} >= {threshold}: waiting for a quieter machine")
        time.sleep(15)
    return {"load_avg_1m": round(os.getloadavg()[0], 2), "waited_s": round(time.time() - t0, 1)}


def _machine_busy() -> float:
    """Busy CPU seconds of all cores since boot (user+nice+system+irq+softirq+steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        v = [int(x) for x in fields]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds (user+system, children that were waited for included) of a process and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict = {}
    stats: dict = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = sum(int(x) for x in fields[11:15]) / tick   # utime stime cutime cstime
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


class Segment:
    """Wall time and CPU split of one measured segment: this process, the server's process tree, others."""

    def __init__(self, server_pid: Optional[int]):
        self.server_pid = server_pid

    def __enter__(self):
        self.t0, self.p0, self.m0 = time.perf_counter(), time.process_time(), _machine_busy()
        self.s0 = tree_cpu_seconds(self.server_pid) if self.server_pid else 0.0
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.process_s = time.process_time() - self.p0
        self.machine_s = _machine_busy() - self.m0
        self.server_s = (tree_cpu_seconds(self.server_pid) - self.s0) if self.server_pid else 0.0

    def as_dict(self) -> dict:
        cores = os.cpu_count() or 1
        other = max(0.0, self.machine_s - self.process_s - self.server_s)
        return {"wall_s": round(self.wall, 2), "cpu_s_benchmark_process": round(self.process_s, 2),
                "cpu_s_triton_tree": round(self.server_s, 2), "cpu_s_other_processes": round(other, 2),
                "machine_busy_fraction": round(self.machine_s / (self.wall * cores), 3)}


def busy_fraction(sample_s: float = 2.0) -> float:
    """Fraction of all cores busy over ``sample_s`` seconds (call it while this benchmark is idle: then it is
    the load of everyone else)."""
    b0, t0 = _machine_busy(), time.perf_counter()
    time.sleep(sample_s)
    return (_machine_busy() - b0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def wait_idle(max_fraction: float, max_wait: float, sample_s: float = 2.0) -> dict:
    """Between rounds, with our own load stopped: wait (up to ``max_wait`` s) until other processes keep
    under ``max_fraction`` of the machine busy, so that a round is not measured during someone's test run."""
    t0 = time.time()
    frac = busy_fraction(sample_s)
    announced = False
    while frac > max_fraction and time.time() - t0 < max_wait:
        if not announced:
            progress(f"other processes keep {frac:.0%} of the machine busy: waiting up to {max_wait:.0f}s")
            announced = True
        frac = busy_fraction(sample_s)
    return {"other_busy_fraction": round(frac, 3), "waited_s": round(time.time() - t0, 1)}


# --------------------------------------------------------------------------------- side-by-side ratios
def other_fraction(segment: dict) -> float:
    """Share of the machine's CPU that other people's processes took during a segment."""
    return segment["cpu_s_other_processes"] / max(1e-9, segment["wall_s"] * (os.cpu_count() or 1))


def paired_ratio(per: dict, a: str, b: str, work: str, max_other: float) -> dict:
    """Throughput of configuration ``a`` over ``b`` from the segments measured side by side in each round.

    ``work`` names the per-segment count (texts, tokens, requests) divided by its ``elapsed_s``. The machine is
    shared, so each round's pair is *clean* when other processes took under ``max_other`` of the CPU in both of
    its segments. ``value`` is the ratio of totals over the clean pairs (all pairs when none is clean, with
    ``basis`` saying so); the all-pairs numbers are kept alongside.
    """
    pairs = list(zip(per[a], per[b]))

    def summary(ps):
        if not ps:
            return {"n": 0}
        rate = lambda recs: sum(r[work] for r in recs) / sum(r["elapsed_s"] for r in recs)  # noqa: E731
        per_round = [(x[work] / x["elapsed_s"]) / (y[work] / y["elapsed_s"]) for x, y in ps]
        return {"n": len(ps), "ratio_of_totals": round(rate([x for x, _ in ps]) / rate([y for _, y in ps]), 4),
                "median_of_rounds": round(statistics.median(per_round), 4),
                "per_round": [round(r, 4) for r in per_round],
                f"{a}_per_s": round(rate([x for x, _ in ps]), 3), f"{b}_per_s": round(rate([y for _, y in ps]), 3)}

    clean = [(x, y) for x, y in pairs if other_fraction(x) < max_other and other_fraction(y) < max_other]
    out = {"clean_rounds": summary(clean), "all_rounds": summary(pairs),
           "clean_definition": f"other processes under {max_other:.0%} of the machine's CPU in both segments"}
    if pairs:
        # Work per CPU-second of this stack (benchmark process + Triton tree), all rounds: less sensitive to other
        # people's load than wall time (though spin-waiting threads under contention still inflate CPU time).
        def per_cpu(recs):
            cpu = sum(r["cpu_s_benchmark_process"] + r["cpu_s_triton_tree"] for r in recs)
            return sum(r[work] for r in recs) / cpu if cpu else float("nan")
        out["all_rounds"]["per_cpu_second_ratio"] = round(per_cpu([x for x, _ in pairs]) /
                                                          per_cpu([y for _, y in pairs]), 4)
    if clean:
        out["value"], out["basis"] = out["clean_rounds"]["ratio_of_totals"], f"{len(clean)} clean round(s)"
    else:
        out["value"], out["basis"] = out["all_rounds"]["ratio_of_totals"], "all rounds (none was clean)"
    return out


def clean_pairs(per: dict, a: str, b: str, max_other: float) -> int:
    return sum(other_fraction(x) < max_other and other_fraction(y) < max_other for x, y in zip(per[a], per[b]))


# ------------------------------------------------------------------------------------------------ plots
def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; None, said on stderr, when matplotlib is not installed (a
    benchmark's numbers never depend on its plot)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed: no plot")
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write (110 dpi) and close a figure of :func:`pyplot`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    progress(f"wrote {display_path(path)}")
