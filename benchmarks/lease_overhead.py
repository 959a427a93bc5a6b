"""What the engine leases add to a `rag` request (issue 12): the same questions, one at a time over HTTP, with
`model_manager` loaded (co-resident, every engine resident: three leases per request, two BLS round trips each)
and then with it unloaded (the leases are no-ops). Tiny profile. Writes results/lease_overhead.json.

  .venv/bin/python benchmarks/lease_overhead.py [--n 40]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragstack.lifecycle.client import ManagerClient  # noqa: E402
from ragstack.governance.manifest import read_manifest  # noqa: E402
from ragstack_dev.server import TritonProcess, access_keys  # noqa: E402
from tests.integration.conftest import CORPUS, ingest  # noqa: E402
from tests.integration.helpers import infer, strings  # noqa: E402

TINY = ROOT / "build" / "models" / "tiny"


def ask(client, headers, q):
    arrays = {"query": strings([q]).reshape(1, 1), "top_k": np.array([[4]], np.int32),
              "top_n": np.array([[2]], np.int32), "max_tokens": np.array([[16]], np.int32),
              "collection": strings(["corpus"]).reshape(1, 1)}
    t0 = time.perf_counter()
    infer(("http", client), "rag", arrays, ["answer"], headers=dict(headers))
    return (time.perf_counter() - t0) * 1000.0


def run(client, headers, n):
    for i in range(3):
        ask(client, headers, f"warm-up {i}")
    return [ask(client, headers, f"Question number {i} about the corpus?") for i in range(n)]


def summary(ms):
    ms = sorted(ms)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "mean_ms": round(statistics.fmean(ms), 1),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    headers = read_manifest(TINY / "generate").headers()
    with tempfile.TemporaryDirectory() as tmp:
        proc = TritonProcess(TINY, load_models="model_manager rag ingest vector_index embed rerank generate",
                             log_path=ROOT / "build" / "logs" / "lease-overhead.log", env={"RAG_DATA_PATH": tmp})
        proc.start()
        try:
            with httpclient.InferenceServerClient(proc.http_url, network_timeout=300) as c, \
                    ManagerClient(proc.http_url, api_key=access_keys().admin_key) as mc:
                mc.wait(lambda s: all(s["models"][m]["state"] == "ready" for m in ("embed", "rerank", "generate")),
                        timeout_s=120)
                ingest(("http", c), [p.stem for p in CORPUS[:3]], [p.read_text() for p in CORPUS[:3]])
                leased = run(c, headers, args.n)
                c.unload_model("model_manager", headers={"admin-key": access_keys().admin_key})
                while c.is_model_ready("model_manager"):
                    time.sleep(0.2)
                time.sleep(6)            # past the orchestrators' 5 s "is the manager loaded" cache
                plain = run(c, headers, args.n)
        finally:
            proc.stop()
    out = {"with_leases": summary(leased), "without_manager": summary(plain)}
    out["added_p50_ms"] = round(out["with_leases"]["p50_ms"] - out["without_manager"]["p50_ms"], 1)
    out["added_mean_ms"] = round(out["with_leases"]["mean_ms"] - out["without_manager"]["mean_ms"], 1)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "lease_overhead.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
