"""``trtexec`` command lines for the embed and rerank plans, from a build spec and an engine folder.

The optimisation profile bounds every activation buffer TensorRT allocates: batch 1..``max_batch_size`` of the
Triton contract (so Triton can never send a batch the plan refuses) and length 1..``engine.max_length`` (what
the BLS tokenizers truncate to). Both inputs get the same shapes: they always have the same shape.

Precision, and what TensorRT 10.x (the pinned container's) really offers for it:

* ``fp8`` and ``nvfp4`` only take effect where the ONNX graph carries FP8 / FP4 quantize-dequantize nodes, which
  ModelOpt inserts with calibration data (``model.fp8.onnx`` / ``model.nvfp4.onnx`` beside ``model.onnx``). Such a
  graph is built strongly typed (``--stronglyTyped``: the graph's types decide, no precision flags allowed).
* Without it, ``fp8`` is the weakly typed ``--fp8 --fp16`` build: FP8 kernels are allowed, but a graph
  without FP8 Q/DQ runs in FP16. trtexec has no ``--nvfp4`` (nor ``--fp4``) flag, so ``nvfp4`` has no such form.
* ``fp16`` (``--fp16``) is the fallback of both.

So a spec yields an ordered list of attempts; the build runs the first whose input exists and falls back to the
next when trtexec fails, and the manifest records which one produced the plan. ``--enableLayerNormPlugin``
and ``--enableQAPlugin``, which older build notes list, are not trtexec options and are left out;
``--skipInference`` is the current name of ``--buildOnly``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ragstack.contracts import tensors as contracts

from engine_builds.onnx_export import ONNX_FILE
from engine_builds.specs import BuildSpec

PLAN_FILE = "model.plan"


@dataclasses.dataclass(frozen=True)
class PlanAttempt:
    label: str          # what the manifest records as the quantisation when this attempt builds the plan
    onnx: Path          # the graph it needs
    argv: tuple


def profile(spec: BuildSpec, max_length: int) -> dict:
    """``{'min'|'opt'|'max': (batch, length)}`` of the optimisation profile."""
    max_batch = contracts.ENGINES[spec.kind].max_batch_size
    opt = (min(spec.plan.opt_batch, max_batch), min(spec.plan.opt_length, max_length))
    return {"min": (1, 1), "opt": opt, "max": (max_batch, max_length)}


def _shapes(kind: str, dims) -> str:
    batch, length = dims
    return ",".join(f"{t.name}:{batch}x{length}" for t in contracts.ENGINES[kind].inputs)


def attempts(spec: BuildSpec, engine_dir: Path, max_length: int, trtexec: str = "trtexec") -> list:
    """The trtexec attempts for ``spec``, best first; ``engine_dir`` holds the ONNX and receives the plan."""
    if spec.plan is None:
        raise ValueError(f"{spec.name} is not a TensorRT plan spec")
    engine_dir = Path(engine_dir)
    plan, shapes = spec.plan, profile(spec, max_length)

    def command(onnx: Path, precision_flags) -> tuple:
        return (trtexec, f"--onnx={onnx}", f"--saveEngine={engine_dir / PLAN_FILE}", f"--device={plan.device}",
                *precision_flags,
                f"--minShapes={_shapes(spec.kind, shapes['min'])}",
                f"--optShapes={_shapes(spec.kind, shapes['opt'])}",
                f"--maxShapes={_shapes(spec.kind, shapes['max'])}",
                f"--memPoolSize=workspace:{plan.workspace_mib}",
                f"--builderOptimizationLevel={plan.optimization_level}",
                f"--hardwareCompatibilityLevel={plan.hardware_compatibility}",
                "--skipInference")

    fp32_onnx = engine_dir / ONNX_FILE
    found = []
    if plan.precision in ("fp8", "nvfp4"):
        quantized = engine_dir / f"model.{plan.precision}.onnx"
        found.append(PlanAttempt(f"{plan.precision} (strongly typed, ModelOpt Q/DQ graph)", quantized,
                                 command(quantized, ("--stronglyTyped",))))
    if plan.precision == "fp8":
        found.append(PlanAttempt("fp8 allowed, fp16 (weakly typed; FP8 only where the graph has FP8 Q/DQ)",
                                 fp32_onnx, command(fp32_onnx, ("--fp8", "--fp16", "--precisionConstraints=prefer"))))
    fallback = "fp16" if plan.precision == "fp16" else f"fp16 (fallback from {plan.precision})"
    found.append(PlanAttempt(fallback, fp32_onnx, command(fp32_onnx, ("--fp16", "--precisionConstraints=prefer"))))
    return found
