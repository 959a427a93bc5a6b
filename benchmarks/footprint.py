#!/usr/bin/env python3
"""Footprint of the Triton Python stubs, before vs after the lean BLS tier (issue 17), in one run.

For each model set (``--models``, default tiny and demo) and each variant — ``before``: a git worktree of
``--before-commit`` (da27121, the BLS stubs tokenizing with transformers) made at ``--before-dir`` with the same
``.venv``/``.triton``/``build/models`` symlinks; ``after``: this checkout — it starts tritonserver the way
ragstack_dev.server.TritonProcess does (that variant's ``tools/serve_triton.sh``, run from that variant's folder,
every model loaded, a fresh data folder), then:

* waits ``--settle`` seconds after the server is ready, and reads every ``triton_python_backend_stub`` child of
  tritonserver from /proc: its model (the ``model.py`` path and instance name on its command line), VmRSS, PSS
  (/proc/<pid>/smaps_rollup: shared pages split between the processes that map them), and whether libtorch is
  mapped; the server total is tritonserver plus every stub (VmRSS sum, which counts shared libraries once per
  process, and PSS sum, which does not);
* with ``--traffic N`` (default 6): ingests data/corpus through `ingest`, asks N questions of `rag` and N of
  `rag_stream`, and reads every stub again (``memory_in_use``: what a serving stub holds, e.g. asyncio, which the
  Python backend imports at a stub's first execute(), and what its caches keep);
* times ``--repeats`` loads of each BLS/orchestration model: unload through the repository API, wait until it
  is gone, then ``POST /v2/repository/models/<m>/load``, which returns when the model is ready (a new stub has
  started, imported model.py and run initialize). One model at a time, so loads do not compete with each other;
  a model's instances start in parallel. On a shared machine the wall time depends on everyone's load, so the
  CPU seconds each new stub spent getting ready (/proc/<pid>/stat) are recorded too.

Targets (issue 17): each BLS/orchestration stub <= 80 MB RSS, a BLS model loads in <= 1 s, the demo server's
total RSS at most half of before. Each is reported as met or not, per model and overall. Progress goes to stderr.

  .venv/bin/python benchmarks/footprint.py                                  # results/footprint.json
  .venv/bin/python benchmarks/footprint.py --models tiny --repeats 1 --out /tmp/footprint.json   # a short try
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, admin_headers, display_path, machine_info, now_iso, progress, write_json  # noqa: E402

from ragstack_dev.server import TritonProcess, access_keys  # noqa: E402

BLS_MODELS = ("embed_text", "rerank_text", "generate_text", "ingest", "rag_orchestrator", "rag_stream_orchestrator",
              "vector_index", "model_manager", "docling")
STUB = "triton_python_backend_stub"
LINKS = (".venv", ".triton", "build/models")
MB = 1e6            # targets are in MB (10^6 bytes); figures are given in MiB as well
TARGET_STUB_MB = 80.0
TARGET_LOAD_S = 1.0
TARGET_DEMO_TOTAL_RATIO = 0.5


# ----------------------------------------------------------------------------------------------- the variants
def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def make_before(folder: Path, commit: str) -> bool:
    """A worktree of ``commit`` at ``folder`` sharing this checkout's venv, Triton and model sets. True when it
    was made here (and so should be removed afterwards)."""
    if (folder / "tools" / "serve_triton.sh").is_file():
        head = git("rev-parse", "HEAD", cwd=folder)
        if not head.startswith(git("rev-parse", commit)[:12]):
            raise SystemExit(f"{folder} exists at {head[:12]}, not {commit}: remove it or pass --before-dir")
        made = False
    else:
        progress(f"git worktree add {folder} {commit}")
        git("worktree", "add", "--detach", str(folder), commit)
        made = True
    for link in LINKS:
        target, path = (ROOT / link).resolve(), folder / link
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
    return made


class VariantServer(TritonProcess):
    """TritonProcess, but with another checkout's launcher, run from that checkout (the Python stubs import the
    ``ragstack`` package of the folder the server runs in)."""

    def __init__(self, root: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.root = root

    def start(self, timeout: float = 900.0) -> "VariantServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, ENGINE_PATH=str(self.engine_path), LOAD_MODELS=self.load_models,
                   TRITON_HTTP_PORT=str(self.http_port), TRITON_GRPC_PORT=str(self.grpc_port),
                   TRITON_METRICS_PORT=str(self.metrics_port), **{**access_keys().env(), **self.env})
        env.pop("PYTHONPATH", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["bash", str(self.root / "tools" / "serve_triton.sh")], env=env,
                                     cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self


# ----------------------------------------------------------------------------------------------- /proc
def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _server_pid(server: TritonProcess) -> int:
    """tritonserver's PID: the launcher execs it (flat store), so it is the launcher's PID; else its child."""
    pid = server.proc.pid
    if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
        return pid
    for child in _children(pid):
        if "tritonserver" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
            return child
    raise RuntimeError(f"no tritonserver under pid {pid}")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def stubs(server_pid: int) -> list[dict]:
    """Every Python stub of the server: model, instance, VmRSS, PSS, libtorch mapped, cwd."""
    rows = []
    for pid in _children(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if not argv or not argv[0].endswith(STUB):
                continue
            model_py = Path(argv[1])
            instance = next((a for a in argv if a.startswith(model_py.parts[-3] + "_")), None)
            rows.append({"pid": pid, "model": model_py.parts[-3], "instance": instance,
                         "rss_kib": _status_kb(pid, "VmRSS"), "pss_kib": _pss_kb(pid),
                         "torch_mapped": _maps_torch(pid), "cwd": os.readlink(f"/proc/{pid}/cwd")})
        except (OSError, IndexError):
            continue                                   # a stub that went away between listing and reading
    return sorted(rows, key=lambda r: (r["model"], r["instance"] or ""))


def memory_snapshot(server_pid: int) -> dict:
    rows = stubs(server_pid)
    server_rss, server_pss = _status_kb(server_pid, "VmRSS"), _pss_kb(server_pid)
    per_model: dict = {}
    for r in rows:
        m = per_model.setdefault(r["model"], {"stubs": 0, "rss_kib": 0, "pss_kib": 0, "max_stub_rss_kib": 0,
                                               "torch_mapped": False})
        m["stubs"] += 1
        m["rss_kib"] += r["rss_kib"]
        m["pss_kib"] += r["pss_kib"]
        m["max_stub_rss_kib"] = max(m["max_stub_rss_kib"], r["rss_kib"])
        m["torch_mapped"] = m["torch_mapped"] or r["torch_mapped"]
    total_rss = server_rss + sum(r["rss_kib"] for r in rows)
    total_pss = server_pss + sum(r["pss_kib"] for r in rows)
    bls = [r for r in rows if r["model"] in BLS_MODELS]
    return {"tritonserver": {"pid": server_pid, "rss_kib": server_rss, "pss_kib": server_pss},
            "stubs": rows, "per_model": per_model,
            "total": {"rss_kib": total_rss, "pss_kib": total_pss, "rss_mib": round(total_rss / 1024, 1),
                      "pss_mib": round(total_pss / 1024, 1), "stubs": len(rows)},
            "bls_total": {"rss_kib": sum(r["rss_kib"] for r in bls), "pss_kib": sum(r["pss_kib"] for r in bls),
                          "stubs": len(bls)}}


# ----------------------------------------------------------------------------------------------- loads
def _post(url: str, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={**admin_headers(),
                                                                                "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _ready(http_url: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/ready", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def time_load(server: TritonProcess, server_pid: int, model: str, timeout: float = 600.0) -> dict:
    """Unload ``model``, wait until its stubs are gone, then time one load through the repository API."""
    status, body = _post(f"http://{server.http_url}/v2/repository/models/{model}/unload", timeout)
    if status != 200:
        raise RuntimeError(f"unload {model}: HTTP {status} {body[:300]}")
    deadline = time.time() + 120
    while time.time() < deadline and (_ready(server.http_url, model)
                                      or any(s["model"] == model for s in stubs(server_pid))):
        time.sleep(0.2)
    t0 = time.perf_counter()
    status, body = _post(f"http://{server.http_url}/v2/repository/models/{model}/load", timeout)
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"load {model}: HTTP {status} {body[:300]}")
    # CPU the new stubs spent getting ready (start, imports, initialize): what a load costs whatever else runs
    cpu = [_cpu_s(s["pid"]) for s in stubs(server_pid) if s["model"] == model]
    return {"load_s": round(elapsed, 3), "load_avg": round(os.getloadavg()[0], 2),
            "stub_cpu_s": [round(c, 2) for c in cpu], "stub_cpu_s_max": round(max(cpu), 2) if cpu else None}


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (and its reaped children) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------- one server
def measure(variant: str, root: Path, models: Path, set_name: str, args) -> dict:
    data = Path(tempfile.mkdtemp(prefix=f"footprint-{variant}-{set_name}-"))
    log = ROOT / "build" / "logs" / f"footprint-{variant}-{set_name}.log"
    server = VariantServer(root, models, log_path=log, env={"RAG_DATA_PATH": str(data)})
    progress(f"[{set_name}/{variant}] starting tritonserver from {root} (log {display_path(log)})")
    t0 = time.perf_counter()
    try:
        server.start(timeout=args.start_timeout)
        ready_s = time.perf_counter() - t0
        pid = _server_pid(server)
        progress(f"[{set_name}/{variant}] ready in {ready_s:.1f} s; settling {args.settle:.0f} s")
        time.sleep(args.settle)
        snapshot = memory_snapshot(pid)
        progress(f"[{set_name}/{variant}] {snapshot['total']['stubs']} stubs, total RSS "
                 f"{snapshot['total']['rss_mib']:.0f} MiB (PSS {snapshot['total']['pss_mib']:.0f} MiB)")
        for model, m in sorted(snapshot["per_model"].items()):
            progress(f"    {model:26s} {m['stubs']} stub(s), max {m['max_stub_rss_kib'] / 1024:7.1f} MiB RSS"
                     f"{'  torch' if m['torch_mapped'] else ''}")
        in_use = None
        if args.traffic:
            served = traffic(server, models, args.traffic)
            time.sleep(2)
            in_use = memory_snapshot(pid)
            progress(f"[{set_name}/{variant}] in use ({served}): total RSS {in_use['total']['rss_mib']:.0f} MiB")
            for model, m in sorted(in_use["per_model"].items()):
                if model in BLS_MODELS:
                    progress(f"    {model:26s} max {m['max_stub_rss_kib'] / 1024:7.1f} MiB RSS in use")
        loads = {}
        for model in BLS_MODELS if args.repeats else ():
            if model not in snapshot["per_model"]:
                continue
            runs = []
            for _ in range(args.repeats):
                runs.append(time_load(server, pid, model))
            loads[model] = {"runs": runs, "median_s": round(statistics.median(r["load_s"] for r in runs), 3)}
            loads[model]["median_stub_cpu_s"] = round(statistics.median(r["stub_cpu_s_max"] or 0 for r in runs), 2)
            progress(f"[{set_name}/{variant}] load {model}: " + ", ".join(f"{r['load_s']:.2f} s" for r in runs)
                     + f" (stub CPU {loads[model]['median_stub_cpu_s']:.2f} s; load average {runs[-1]['load_avg']})")
        after_loads = memory_snapshot(pid) if loads else None
        return {"root": str(root), "commit": git("rev-parse", "HEAD", cwd=root), "dirty": bool(
                    git("status", "--porcelain", "--untracked-files=no", cwd=root)),
                "ready_s": round(ready_s, 1), "settle_s": args.settle, "memory": snapshot,
                "memory_in_use": in_use,
                "loads": loads, "memory_after_reloads": after_loads,
                "stub_cwds": sorted({s["cwd"] for s in snapshot["stubs"]}), "log": display_path(log)}
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def traffic(server: TritonProcess, models: Path, queries: int) -> str:
    """What a serving stub has done: data/corpus ingested through `ingest`, then ``queries`` `rag` questions over
    gRPC (each orchestrator instance, the engines, the index) and as many over `rag_stream`."""
    import tritonclient.grpc as grpcclient

    from common import eval_questions, identity_headers, ingest_corpus
    from ragstack.contracts import client as client_io
    from tests.integration.helpers import stream, strings

    ingest_corpus(server.http_url)
    headers = identity_headers(models)
    questions = eval_questions()[:queries]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for q in questions:
            client.infer("rag", client_io.infer_inputs(grpcclient, "rag", {"query": q}), headers=dict(headers),
                         client_timeout=600)
    finally:
        client.close()
    for q in questions:
        stream(server.grpc_url, "rag_stream", {"query": strings([q]).reshape(1, 1)}, timeout=600, headers=headers,
               auth=False)
    return f"corpus ingested, {len(questions)} rag + {len(questions)} rag_stream questions"


# ----------------------------------------------------------------------------------------------- verdicts
def verdicts(runs: dict) -> dict:
    out = {}
    for set_name, variants in runs.items():
        after, before = variants.get("after"), variants.get("before")
        if not after:
            continue
        stub_mb = {m: round(v["max_stub_rss_kib"] * 1024 / MB, 1) for m, v in after["memory"]["per_model"].items()
                   if m in BLS_MODELS}
        loads = {m: v["median_s"] for m, v in after["loads"].items()}
        entry = {
            "stub_rss_mb_after": {m: {"value": v, "target": f"<= {TARGET_STUB_MB}", "pass": v <= TARGET_STUB_MB}
                                  for m, v in sorted(stub_mb.items())},
            "load_s_after": {m: {"value": v, "target": f"<= {TARGET_LOAD_S}", "pass": v <= TARGET_LOAD_S}
                             for m, v in sorted(loads.items())},
            "bls_without_torch_after": sorted(m for m, v in after["memory"]["per_model"].items()
                                              if m in BLS_MODELS and not v["torch_mapped"]),
            "bls_with_torch_after": sorted(m for m, v in after["memory"]["per_model"].items()
                                           if m in BLS_MODELS and v["torch_mapped"]),
        }
        entry["all_stubs_within_80mb"] = all(v["pass"] for v in entry["stub_rss_mb_after"].values())
        if after.get("memory_in_use"):
            used = {m: round(v["max_stub_rss_kib"] * 1024 / MB, 1)
                    for m, v in after["memory_in_use"]["per_model"].items() if m in BLS_MODELS}
            entry["stub_rss_mb_in_use_after"] = {m: {"value": v, "target": f"<= {TARGET_STUB_MB}",
                                                     "pass": v <= TARGET_STUB_MB} for m, v in sorted(used.items())}
            entry["all_stubs_within_80mb_in_use"] = all(v["pass"] for v in entry["stub_rss_mb_in_use_after"].values())
            if before and before.get("memory_in_use"):
                entry["stub_rss_mib_in_use"] = {m: {"before": round(before["memory_in_use"]["per_model"].get(m, {}).get(
                    "max_stub_rss_kib", 0) / 1024, 1), "after": round(v["max_stub_rss_kib"] / 1024, 1)}
                    for m, v in sorted(after["memory_in_use"]["per_model"].items()) if m in BLS_MODELS}
        entry["all_loads_within_1s"] = bool(loads) and all(v["pass"] for v in entry["load_s_after"].values())
        if before:
            b, a = before["memory"]["total"], after["memory"]["total"]
            entry["total_rss_mib"] = {"before": b["rss_mib"], "after": a["rss_mib"],
                                      "ratio": round(a["rss_kib"] / b["rss_kib"], 3)}
            entry["total_pss_mib"] = {"before": b["pss_mib"], "after": a["pss_mib"],
                                      "ratio": round(a["pss_kib"] / b["pss_kib"], 3)}
            entry["bls_rss_mib"] = {"before": round(before["memory"]["bls_total"]["rss_kib"] / 1024, 1),
                                    "after": round(after["memory"]["bls_total"]["rss_kib"] / 1024, 1)}
            entry["stub_rss_mib"] = {m: {"before": round(before["memory"]["per_model"].get(m, {}).get(
                "max_stub_rss_kib", 0) / 1024, 1), "after": round(v["max_stub_rss_kib"] / 1024, 1)}
                for m, v in sorted(after["memory"]["per_model"].items())}
            entry["load_s"] = {m: {"before": before["loads"].get(m, {}).get("median_s"), "after": v}
                               for m, v in sorted(loads.items())}
            entry["load_stub_cpu_s"] = {m: {"before": before["loads"].get(m, {}).get("median_stub_cpu_s"),
                                            "after": after["loads"][m].get("median_stub_cpu_s")}
                                        for m in sorted(loads)}
            if set_name == "demo":
                ratio = entry["total_rss_mib"]["ratio"]
                entry["demo_total_at_most_half"] = {"value": ratio, "target": f"<= {TARGET_DEMO_TOTAL_RATIO}",
                                                    "pass": ratio <= TARGET_DEMO_TOTAL_RATIO}
        out[set_name] = entry
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    ap.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--before-commit", default="da27121")
    ap.add_argument("--before-dir", type=Path, default=Path("/tmp/footprint-before"))
    ap.add_argument("--keep-before", action="store_true", help="leave the before worktree in place")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds after ready before reading memory")
    ap.add_argument("--repeats", type=int, default=2, help="timed loads per BLS model (0: none)")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--traffic", type=int, default=6,
                    help="after the idle reading: ingest the corpus, ask this many rag and rag_stream questions, read "
                         "again (0: no traffic)")
    ap.add_argument("--out", type=Path, default=RESULTS / "footprint.json")
    args = ap.parse_args()

    made = False
    if "before" in args.variants:
        made = make_before(args.before_dir, args.before_commit)
    roots = {"before": args.before_dir.resolve(), "after": ROOT}
    result = {"benchmark": "footprint", "issue": "17: each BLS/orchestration stub <= 80 MB RSS, a BLS model loads "
              "in <= 1 s, demo server total RSS <= half of before", "started": now_iso(),
              "machine": machine_info(), "before_commit": args.before_commit,
              "method": "per variant and model set: one tritonserver (the variant's tools/serve_triton.sh from its "
                        "folder, every model loaded, fresh data folder); after ready + settle, VmRSS and PSS of "
                        "tritonserver and every triton_python_backend_stub child (/proc), libtorch mapped or not; "
                        "then each BLS model unloaded and reloaded through the repository API, one at a time, the "
                        "load call timed (it returns when the model is ready). With --traffic N, between the two: "
                        "the corpus ingested and N rag + N rag_stream questions asked, then every stub read again "
                        "(memory_in_use).",
              "runs": {}}
    try:
        for set_name in args.models:
            models = ROOT / "build" / "models" / set_name
            if not (models / "generate" / "engine.json").is_file():
                progress(f"{set_name}: not built, skipped (tools/build_models.py {set_name})")
                continue
            result["runs"][set_name] = {}
            for variant in args.variants:
                result["runs"][set_name][variant] = measure(variant, roots[variant], models, set_name, args)
                result["verdicts"] = verdicts(result["runs"])
                write_json(args.out, result)              # partial results survive a later failure
    finally:
        if made and not args.keep_before:
            progress(f"git worktree remove {args.before_dir}")
            subprocess.run(["git", "worktree", "remove", "--force", str(args.before_dir)], cwd=ROOT, check=False)
    result["finished"] = now_iso()
    result["load_avg_at_end"] = list(os.getloadavg())
    result["verdicts"] = verdicts(result["runs"])
    write_json(args.out, result)
    for set_name, v in result["verdicts"].items():
        progress(f"{set_name}: stubs <= 80 MB: {v['all_stubs_within_80mb']}, loads <= 1 s: {v['all_loads_within_1s']}"
                 + (f", total RSS {v['total_rss_mib']['before']:.0f} -> {v['total_rss_mib']['after']:.0f} MiB "
                    f"(x{v['total_rss_mib']['ratio']})" if "total_rss_mib" in v else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
