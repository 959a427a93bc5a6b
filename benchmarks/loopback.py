"""The loopback path of the `generate` streams, before (gRPC, tritonclient) vs after (HTTP, the generate extension),
side by side in one run.

Every streamed `generate` call of the pipeline leaves the BLS path for the server's own endpoint
(ragstack/triton/loopback.py). Until issue 17's last round that was a gRPC stream through ``tritonclient.grpc``;
now it is ``/generate_stream`` on a keep-alive HTTP connection written on ``socket``. This benchmark starts one
tiny-set tritonserver per variant (``generate``, ``generate_text`` and ``model_manager`` loaded; before = a git
worktree of ``--before-commit`` sharing this checkout's venv, Triton and model sets), alternating the variants
``--rounds`` times, and times ``--calls`` 1-token ``generate_text`` requests over HTTP ``/generate`` after
``--warmup`` unmeasured ones: the client's round trip, which holds one loopback stream from ``generate_text`` to
``generate``. It also reads the RSS of the ``generate_text`` stubs after the calls.

  .venv/bin/python benchmarks/loopback.py                  # results/loopback.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, display_path, machine_info, now_iso, progress, write_json  # noqa: E402
from footprint import VariantServer, git, make_before, stubs, _server_pid  # noqa: E402

from ragstack.governance.manifest import read_manifest  # noqa: E402
from ragstack_dev.server import access_keys  # noqa: E402

MODELS = "generate generate_text model_manager"


def call(http_url: str, body: dict) -> float:
    req = urllib.request.Request(f"http://{http_url}/v2/models/generate_text/generate", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return (time.perf_counter() - t0) * 1000.0


def measure(root: Path, models: Path, args) -> dict:
    data = Path(tempfile.mkdtemp(prefix="loopback-bench-"))
    server = VariantServer(root, models, load_models=MODELS, env={"RAG_DATA_PATH": str(data)},
                           log_path=ROOT / "build" / "logs" / "bench-loopback.log")
    try:
        server.start(timeout=600)
        keys = access_keys()
        identity = {k.lower(): str(v) for k, v in read_manifest(models / "generate").headers().items()}
        body = {"prompt": "hello there", "max_tokens": 1, "temperature": 0.0, **identity,
                **keys.headers()}
        for _ in range(args.warmup):
            call(server.http_url, body)
        times = [call(server.http_url, body) for _ in range(args.calls)]
        rss = [round(s["rss_kib"] / 1024, 1) for s in stubs(_server_pid(server)) if s["model"] == "generate_text"]
        return {"root": str(root), "commit": git("rev-parse", "HEAD", cwd=root), "ms": times,
                "generate_text_rss_mib": rss}
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def summary(times: list) -> dict:
    ordered = sorted(times)
    return {"n": len(times), "median_ms": round(statistics.median(times), 3),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3), "mean_ms": round(statistics.fmean(times), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-commit", default="6a0106d", help="the last commit with the gRPC loopback")
    ap.add_argument("--before-dir", type=Path, default=Path(tempfile.gettempdir()) / "ragstack-loopback-before")
    ap.add_argument("--models", type=Path, default=ROOT / "build" / "models" / "tiny")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "loopback.json")
    args = ap.parse_args()
    made = make_before(args.before_dir, args.before_commit)
    started = now_iso()
    runs: dict = {"before": [], "after": []}
    try:
        for r in range(args.rounds):
            for variant, root in (("before", args.before_dir), ("after", ROOT)):
                progress(f"[round {r + 1}/{args.rounds}] {variant}: {args.calls} 1-token generate_text calls")
                run = measure(root, args.models, args)
                run["summary"] = summary(run["ms"])
                runs[variant].append(run)
                progress(f"    median {run['summary']['median_ms']:.2f} ms, generate_text RSS "
                         f"{run['generate_text_rss_mib']} MiB")
    finally:
        if made:
            git("worktree", "remove", "--force", str(args.before_dir))
    before = summary([t for run in runs["before"] for t in run["ms"]])
    after = summary([t for run in runs["after"] for t in run["ms"]])
    result = {"benchmark": "loopback", "issue": 17, "started": started, "finished": now_iso(),
              "machine": machine_info(), "before_commit": args.before_commit,
              "method": "per round and variant one tiny-set tritonserver (generate, generate_text, model_manager), "
                        f"{args.warmup} unmeasured then {args.calls} measured 1-token generate_text requests over "
                        "HTTP /generate, one at a time; variants alternate",
              "before": {"loopback": "gRPC stream (tritonclient.grpc)", **before},
              "after": {"loopback": "HTTP /generate_stream on a kept socket connection", **after},
              "after_over_before_median": round(after["median_ms"] / before["median_ms"], 3),
              "runs": {v: [{k: x for k, x in run.items() if k != "ms"} for run in rs] for v, rs in runs.items()}}
    write_json(args.out, result)
    progress(f"wrote {display_path(args.out)}: median {before['median_ms']:.2f} -> {after['median_ms']:.2f} ms "
             f"({result['after_over_before_median']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
