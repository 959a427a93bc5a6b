#!/usr/bin/env python3
"""Build the production (trtllm profile) engines from the build specs in engine_builds/specs/.

  export          ONNX export of an embed/rerank model into an engine folder (CPU; --verify checks it)
  plan            trtexec: the ONNX in an engine folder -> model.plan; runs in the TensorRT container
                  (ragstack.contracts.tensors.TENSORRT_CONTAINER, tools/build_plans.sh), not in the trtllm image
  trtllm          TensorRT-LLM checkpoint + trtllm-build for a generator, with tokenizer and tokenizer info
  tokenizer-info  the xgrammar tokenizer info the tensorrtllm backend reads (xgrammar_tokenizer_info_path)
  manifest        write manifest.json for any engine folder (e.g. a reference model set)
  verify          compare an engine folder with its manifest
  repository      check/fix model_repository/trtllm's version folders (plan models, generate's README)
  all             every step of a model set: export + plan (embed, rerank), trtllm (generate)

plan, trtllm and all take --dry-run: print the exact commands and change nothing. Without it they need the
tools of the pinned container and stop with exit code 3, saying so, where those are absent.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from typing import Optional
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ragstack.governance.engine_spec import EngineSpec  # noqa: E402
from ragstack.governance.manifest import read_manifest, update_manifest, verify_manifest  # noqa: E402

from engine_builds import onnx_export, repository, trtexec, trtllm  # noqa: E402
from engine_builds.specs import BuildSpec, load_spec, model_set, set_names, spec_names  # noqa: E402
from engine_builds.tools import (ToolMissing, examples_dir, python_versions, require_tool, run, show,  # noqa: E402
                                 trtexec_version, trtllm_version)

EXIT_FAILED, EXIT_USAGE, EXIT_TOOL_MISSING = 1, 2, 3


def log(message: str) -> None:
    print(f"[engine_builds] {message}", file=sys.stderr, flush=True)


def emit(line: str = "") -> None:
    """Dry-run output: the commands on stdout, so they can be saved as a script."""
    print(line, flush=True)


class BuildFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ steps
def step_export(spec: BuildSpec, model_dir: Path, out: Path, verify: bool) -> None:
    if spec.blocked:
        raise BuildFailed(f"{spec.name} cannot be built: {spec.blocked}")
    onnx_path = onnx_export.export(spec, model_dir, out)
    log(f"{spec.name}: exported {onnx_path}")
    if verify:
        engine = EngineSpec.read(out)
        with tempfile.TemporaryDirectory() as scratch:
            reference = onnx_export.reference_engine(spec, model_dir, Path(scratch))
            worst = onnx_export.verify(onnx_export.onnx_session(onnx_path), reference, reference.vocab_size,
                                       engine.max_length)
        log(f"{spec.name}: ONNX Runtime vs reference engine, max |diff| = {worst:.2e}")
        if worst > 1e-4:
            raise BuildFailed(f"{spec.name}: the ONNX graph differs from the reference by {worst:.2e}")


def _plan_engine(spec: BuildSpec, out: Path, model_dir) -> EngineSpec:
    """The engine.json the plan is built for: the exported folder's, else the spec's (dry run before export)."""
    return EngineSpec.read(out) if (out / "engine.json").is_file() else spec.engine_spec(model_dir)


def step_plan(spec: BuildSpec, out: Path, dry_run: bool, model_dir=None) -> None:
    engine = _plan_engine(spec, out, model_dir)
    if dry_run:
        found = trtexec.attempts(spec, out, engine.max_length)
        emit(f"# {spec.kind} ({spec.name}): TensorRT plan; the first attempt whose ONNX exists and builds is kept")
        for number, attempt in enumerate(found, start=1):
            emit(f"# {number}. {attempt.label}; needs {attempt.onnx}")
            emit(show(attempt.argv))
        return
    binary = require_tool("trtexec")
    for attempt in trtexec.attempts(spec, out, engine.max_length, trtexec=binary):
        if not attempt.onnx.is_file():
            log(f"{spec.name}: skipping '{attempt.label}': {attempt.onnx} does not exist")
            continue
        result = run(attempt.argv, log=log)
        if result.returncode == 0:
            tools = python_versions(("onnx",))
            tools["tensorrt"] = trtexec_version(result.output) or "unknown"
            update_manifest(out, kind=spec.kind, name=engine.name, step="plan", quantisation=attempt.label,
                            args={"spec": spec.name, "attempt": attempt.label, "argv": list(attempt.argv)},
                            tools=tools)
            log(f"{spec.name}: built {out / trtexec.PLAN_FILE} ({attempt.label})")
            return
        log(f"{spec.name}: '{attempt.label}' failed (exit {result.returncode}); trying the next attempt")
    raise BuildFailed(f"{spec.name}: no trtexec attempt built a plan")


def step_trtllm(spec: BuildSpec, model_dir: Path, out: Path, examples: Path, dry_run: bool,
                sm: Optional[int] = None) -> None:
    if spec.blocked:
        raise BuildFailed(f"{spec.name} cannot be built: {spec.blocked}")
    if sm is None and not dry_run:
        sm = trtllm.detect_sm()
    refusal = trtllm.sm_refusal(spec, sm)
    if refusal:
        raise BuildFailed(refusal)
    engine = spec.engine_spec(model_dir)
    work = out.parent / f".{out.name}-work"
    steps = trtllm.commands(spec, engine, model_dir, out, work, examples)
    if dry_run:
        emit(f"# generate ({spec.name}): TensorRT-LLM {trtllm.quantisation(spec)}; then the tokenizer, engine.json "
             f"and {out / 'tokenizer_info.json'} are written by this tool")
        for step in steps:
            emit(f"# {step.label}")
            emit(show(step.argv))
        return
    require_tool("trtllm-build")
    script = Path(steps[0].argv[1])
    if not script.is_file():
        raise ToolMissing(f"{script} not found: point --trtllm-examples (or TRTLLM_EXAMPLES) at the examples/ "
                          "folder of a TensorRT-LLM checkout of the container's release")
    for step in steps:
        result = run(step.argv, log=log)
        if result.returncode != 0:
            raise BuildFailed(f"{spec.name}: {step.label} failed (exit {result.returncode})")
    from engine_builds.tokenizer_info import write_tokenizer_info   # imports torch: not in the TensorRT container

    onnx_export.copy_tokenizer(model_dir, out)
    engine.write(out)
    write_tokenizer_info(out, stop_token_ids=[engine.end_id])
    tools = python_versions(("transformers", "xgrammar"))
    tools["tensorrt_llm"] = trtllm_version() or "unknown"
    update_manifest(out, kind="generate", name=engine.name, step="trtllm", quantisation=trtllm.quantisation(spec),
                    args={"spec": spec.name, "source": spec.source, "commands": [list(s.argv) for s in steps]},
                    tools=tools)
    shutil.rmtree(work, ignore_errors=True)
    log(f"{spec.name}: built {out / trtllm.ENGINE_SUBDIR}")


# ------------------------------------------------------------------------------------------------- CLI
def cmd_export(args) -> None:
    step_export(load_spec(args.spec), args.model_dir, args.out, args.verify)


def cmd_plan(args) -> None:
    step_plan(load_spec(args.spec), args.out, args.dry_run, args.model_dir)


def cmd_trtllm(args) -> None:
    step_trtllm(load_spec(args.spec), args.model_dir, args.out, examples_dir(args.trtllm_examples), args.dry_run,
                args.sm)


def cmd_tokenizer_info(args) -> None:
    from engine_builds.tokenizer_info import write_tokenizer_info

    path = write_tokenizer_info(args.tokenizer_dir, args.out, args.stop_token_ids)
    log(f"wrote {path}")
    folder = path.parent
    if (folder / "manifest.json").is_file():
        manifest = read_manifest(folder)
        update_manifest(folder, kind=manifest.kind, name=manifest.name, step="tokenizer_info",
                        args={"tokenizer_dir": args.tokenizer_dir, "stop_token_ids": args.stop_token_ids},
                        tools=python_versions(("transformers", "tokenizers", "xgrammar")))


def cmd_manifest(args) -> None:
    engine = EngineSpec.read(args.folder)
    prices = (args.price_per_1k_input, args.price_per_1k_output)
    if (prices[0] is None) != (prices[1] is None):
        raise ValueError("give both --price-per-1k-input and --price-per-1k-output, or neither")
    pricing = None if prices[0] is None else {"price_per_1k_input_usd": prices[0],
                                               "price_per_1k_output_usd": prices[1]}
    manifest = update_manifest(args.folder, kind=engine.kind, name=engine.name, step=args.step,
                               args={"folder": args.folder}, tools=python_versions(), quantisation=args.quantisation,
                               pricing=pricing)
    log(f"{args.folder}: engine hash {manifest.engine_hash}")


def cmd_verify(args) -> None:
    problems = verify_manifest(args.folder)
    for line in problems:
        log(line)
    if problems:
        raise BuildFailed(f"{args.folder} does not match its manifest")
    log(f"{args.folder}: matches its manifest ({read_manifest(args.folder).engine_hash})")


def cmd_repository(args) -> None:
    if args.check:
        problems = repository.check(ROOT)
        for line in problems:
            log(line)
        if problems:
            raise BuildFailed("model_repository/trtllm: run engine_builds/build.py repository")
        return
    for path in repository.link(ROOT):
        log(f"wrote {path.relative_to(ROOT)}")


def cmd_all(args) -> None:
    specs = model_set(args.set)
    examples = examples_dir(args.trtllm_examples)
    for kind in ("embed", "rerank"):
        spec, model_dir, out = specs[kind], args.models_root / kind, args.out / kind
        if args.dry_run:
            emit(f"# {kind} ({spec.name}): ONNX export (CPU, this tool)")
            emit(show(("python3", "engine_builds/build.py", "export", "--spec", spec.name, "--model-dir", model_dir,
                       "--out", out, "--verify")))
        else:
            step_export(spec, model_dir, out, verify=True)
        step_plan(spec, out, args.dry_run, model_dir)
    step_trtllm(specs["generate"], args.models_root / "generate", args.out / "generate", examples, args.dry_run,
                args.sm)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def spec_arg(p):
        p.add_argument("--spec", required=True, help=f"one of: {', '.join(spec_names())}")

    p = sub.add_parser("export", help="ONNX export into an engine folder")
    spec_arg(p)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="engine folder, e.g. build/engines/tiny/embed")
    p.add_argument("--verify", action="store_true", help="check ONNX Runtime against the reference engine")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="TensorRT plan with trtexec")
    spec_arg(p)
    p.add_argument("--out", type=Path, required=True, help="the exported engine folder")
    p.add_argument("--model-dir", type=Path, help="only for --dry-run before the export")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("trtllm", help="TensorRT-LLM engine for a generator")
    spec_arg(p)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="engine folder, e.g. build/engines/production/generate")
    p.add_argument("--trtllm-examples", help="TensorRT-LLM examples/ folder [$TRTLLM_EXAMPLES or "
                                             "TensorRT-LLM/examples]")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--sm", type=int, help="the target GPU's SM version, e.g. 90 (H100), 100 (B200), 120 (RTX 5090) "
                                          "[nvidia-smi's, when not a dry run]")
    p.set_defaults(func=cmd_trtllm)

    p = sub.add_parser("tokenizer-info", help="xgrammar tokenizer info for the tensorrtllm backend")
    p.add_argument("--tokenizer-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, help="default: <tokenizer-dir>/tokenizer_info.json")
    p.add_argument("--stop-token-ids", type=int, nargs="+", help="default: the tokenizer's eos token")
    p.set_defaults(func=cmd_tokenizer_info)

    p = sub.add_parser("manifest", help="write manifest.json for an engine folder that has an engine.json")
    p.add_argument("folder", type=Path)
    p.add_argument("--step", default="reference", help="what made the folder [reference]")
    p.add_argument("--quantisation", default=None, help="[kept from an earlier manifest, else 'none']")
    p.add_argument("--price-per-1k-input", type=float, help="USD, for the cost policy [kept from an earlier manifest]")
    p.add_argument("--price-per-1k-output", type=float, help="USD, for the cost policy")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("verify", help="check an engine folder against its manifest")
    p.add_argument("folder", type=Path)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("repository", help="check/fix model_repository/trtllm's version folders")
    p.add_argument("--check", action="store_true", help="only check; exit 1 when anything is off")
    p.set_defaults(func=cmd_repository)

    p = sub.add_parser("all", help="every step for a model set")
    p.add_argument("--set", required=True, help=f"one of: {', '.join(set_names())}")
    p.add_argument("--models-root", type=Path, required=True, help="folder with embed/, rerank/, generate/")
    p.add_argument("--out", type=Path, required=True, help="engine set folder, e.g. build/engines/production")
    p.add_argument("--trtllm-examples")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--sm", type=int, help="the target GPU's SM version [nvidia-smi's, when not a dry run]")
    p.set_defaults(func=cmd_all)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except ToolMissing as e:
        log(str(e))
        return EXIT_TOOL_MISSING
    except (BuildFailed, FileNotFoundError, ValueError, KeyError) as e:
        log(f"error: {e}")
        return EXIT_FAILED if isinstance(e, BuildFailed) else EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
