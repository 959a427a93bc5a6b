#!/usr/bin/env python3
"""Operate the model lifecycle manager (the `model_manager` model) of a running server over HTTP.

  tools/lifecycle.py [--url 127.0.0.1:8000] status [--json]
  tools/lifecycle.py prewarm MODEL | unload MODEL | heal MODEL [--force] | history MODEL
  tools/lifecycle.py set-mode co_resident|sequential [--phases embed rerank generate] [--no-cyclic]
  tools/lifecycle.py configure [--budget 12G] [--safety-buffer 0.15] [--cooldown 10] [--parallel-loads 2]
  tools/lifecycle.py canary start MODEL --version N [--share 0.1] [--min-requests 50] [--promote-after 200]
                                        [--max-error-rate 0.02] [--max-latency-ratio R] [--engine-dir DIR]
                                        [--wait]
  tools/lifecycle.py canary status MODEL
  tools/lifecycle.py rollback MODEL --root-cause "..." [--wait]

A rollback restores the version the current one replaced (or aborts a running canary), re-runs the engine's
warm-up and logs `llm_rollback_completed` with the root cause (see the event log of the runtime policy).
Exit status: 0 done, 1 the manager refused (the reason is printed), 2 the server could not be reached.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragstack.lifecycle.client import ManagerClient  # noqa: E402

MiB = 1 << 20


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.0f} MiB"


def print_status(st: dict) -> None:
    b = st["budget"]
    print(f"mode {st['mode']} (phases {' -> '.join(st['phases'])}), cooldown {st['cooldown_s']:g} s, "
          f"{st['leases']} lease(s), loads {st['loads_running']} running of {st['parallel_loads']} at once")
    print(f"memory {_mib(st['used_bytes'])} used of {_mib(b['total_bytes'])} (high-watermark "
          f"{_mib(b['watermark_bytes'])}, safety buffer {b['safety_buffer']:.0%}), headroom "
          f"{_mib(st['headroom_bytes'])}")
    print(f"{'model':<12}{'state':<11}{'in use':>7}{'footprint':>13}{'last load':>11}{'loads':>7}{'evict':>7}"
          f"{'heals':>7}  versions  note")
    for name, m in st["models"].items():
        note = m["blocked"] or m["error"] or (f"canary {m['canary_state']}" if m["canary_state"] else "")
        load = "-" if m["load_seconds"] is None else f"{m['load_seconds']:.1f} s"
        fp = _mib(m["footprint_bytes"]) + ("" if m["measured"] else "*")
        print(f"{name:<12}{m['state']:<11}{m['refcount']:>7}{fp:>13}{load:>11}{m['loads']:>7}{m['evictions']:>7}"
              f"{m['heals']:>7}  {','.join(map(str, m['versions'])) or 'default':<8}  {note}")
    print("(* seeded estimate, not yet measured)")


def wait_rollout(mc: ManagerClient, model: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = mc.model(model)
        if m["rollout"] is None and m["canary_state"] in (None, "running"):
            return m
        time.sleep(0.5)
    raise TimeoutError(f"{model}: rollout still in progress after {timeout_s:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address")
    ap.add_argument("--api-key", help="the admin key (every command but status needs it; default: $RAG_ADMIN_KEY or "
                    "the file $RAG_ADMIN_KEY_FILE; prefer those: a flag shows in the process list)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status")
    s.add_argument("--json", action="store_true")
    for name in ("prewarm", "unload", "history"):
        sub.add_parser(name).add_argument("model")
    h = sub.add_parser("heal")
    h.add_argument("model")
    h.add_argument("--force", action="store_true", help="reload even if its stubs look alive")
    m = sub.add_parser("set-mode")
    m.add_argument("mode", choices=("co_resident", "sequential"))
    m.add_argument("--phases", nargs="+")
    m.add_argument("--no-cyclic", action="store_true", help="the last phase does not pre-warm the first")
    c = sub.add_parser("configure")
    c.add_argument("--budget", help="bytes, or 512M / 12G, or auto (the GPU's memory, else half the host's)")
    c.add_argument("--safety-buffer", type=float)
    c.add_argument("--cooldown", type=float)
    c.add_argument("--parallel-loads", type=int, help="loads that may run at the same time (1: one after another)")
    can = sub.add_parser("canary").add_subparsers(dest="canary_cmd", required=True)
    cs = can.add_parser("start")
    cs.add_argument("model")
    cs.add_argument("--version", type=int, required=True)
    cs.add_argument("--share", type=float, default=0.1)
    cs.add_argument("--min-requests", type=int, default=50)
    cs.add_argument("--promote-after", type=int, default=200)
    cs.add_argument("--max-error-rate", type=float, default=0.02)
    cs.add_argument("--max-latency-ratio", type=float)
    cs.add_argument("--engine-dir", help="the new version's engine folder (its manifest goes into the history)")
    cs.add_argument("--wait", action="store_true", help="wait until the canary serves traffic")
    can.add_parser("status").add_argument("model")
    r = sub.add_parser("rollback")
    r.add_argument("model")
    r.add_argument("--root-cause", required=True)
    r.add_argument("--wait", action="store_true", help="wait until the restored version is warmed up")
    args = ap.parse_args(argv)

    from tritonclient.utils import InferenceServerException

    try:
        with ManagerClient(args.url, api_key=args.api_key) as mc:
            return run(mc, args)
    except InferenceServerException as e:
        print(f"lifecycle: {e.message()}", file=sys.stderr)
        return 1 if e.status() in ("400", "StatusCode.INVALID_ARGUMENT") else 2
    except (ConnectionError, OSError) as e:
        print(f"lifecycle: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2


def run(mc: ManagerClient, args) -> int:
    out = None
    if args.cmd == "status":
        st = mc.status()
        if args.json:
            out = st
        else:
            print_status(st)
    elif args.cmd in ("prewarm", "unload", "history"):
        out = mc.call(args.cmd, args.model)
    elif args.cmd == "heal":
        out = mc.call("heal", args.model, {"force": args.force})
    elif args.cmd == "set-mode":
        payload = {"mode": args.mode, "cyclic": not args.no_cyclic}
        if args.phases:
            payload["phases"] = args.phases
        out = mc.call("set_mode", payload=payload)
    elif args.cmd == "configure":
        payload = {k: v for k, v in (("budget_bytes", args.budget), ("safety_buffer", args.safety_buffer),
                                     ("cooldown_s", args.cooldown), ("parallel_loads", args.parallel_loads))
                   if v is not None}
        out = mc.call("configure", payload=payload)
    elif args.cmd == "canary" and args.canary_cmd == "start":
        payload = {"version": args.version, "share": args.share, "min_requests": args.min_requests,
                   "promote_after": args.promote_after, "max_error_rate": args.max_error_rate}
        if args.max_latency_ratio is not None:
            payload["max_latency_ratio"] = args.max_latency_ratio
        if args.engine_dir:
            payload["engine_dir"] = args.engine_dir
        out = mc.call("canary_start", args.model, payload)
        if args.wait:
            out = wait_rollout(mc, args.model, 900)
    elif args.cmd == "canary":
        out = mc.call("canary_status", args.model)
    elif args.cmd == "rollback":
        out = mc.call("rollback", args.model, {"root_cause": args.root_cause})
        if args.wait:
            m = wait_rollout(mc, args.model, 900)
            out = {"model": args.model, "versions": m["versions"], "state": m["state"],
                   "last_canary": m["last_canary"]}
    if out is not None:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
