"""TensorRT-LLM command lines for the generator: a checkpoint, then ``trtllm-build``.

Flags are those of TensorRT-LLM 1.0 (``ragstack.contracts.tensors.TRTLLM_VERSION``, the release the pinned container
ships): ``trtllm-build``'s own options plus its plugin options (``--gpt_attention_plugin``, ``--gemm_plugin``,
``--use_paged_context_fmha``, ``--remove_input_padding``, each ``enable``/``disable`` or a dtype / ``auto``).
``--kv_cache_type paged`` is the current spelling of the deprecated ``--paged_kv_cache enable``.

What each build choice is for:

* paged KV cache + paged context FMHA: the KV cache in blocks, which is what KV-cache reuse
  (``enable_kv_cache_reuse``) and chunked context (``enable_chunked_context``) in the Triton config need;
* remove_input_padding + the GPT attention plugin: packed sequences, required for in-flight batching;
* max_batch_size / max_input_len / max_seq_len: the capacity plan (4 requests, 4,096 prompt tokens, 6,000 in
  all; docs/design-notes.md#engines), taken from the build spec's engine fields, which the BLS ``generate_text``
  model enforces too;
* max_num_tokens: the tokens one iteration may process; it bounds the activation memory, and with chunked context
  a longer context is processed in chunks of it.

The checkpoint comes from TensorRT-LLM's example scripts, which are not part of the installed package: the build
needs their folder (``--trtllm-examples``, a checkout of the same release).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ragstack.contracts.tensors import TRTLLM_VERSION
from ragstack.governance.engine_spec import EngineSpec

from engine_builds.specs import BuildSpec

PYTHON = "python3"             # the container's interpreter, which has tensorrt_llm and ModelOpt
QUANTIZE_SCRIPT = "quantization/quantize.py"
ENGINE_SUBDIR = "trtllm"       # the engine inside the generate folder (gpt_model_path points at it)


@dataclasses.dataclass(frozen=True)
class Step:
    label: str
    argv: tuple


def checkpoint_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "checkpoint"


def commands(spec: BuildSpec, engine: EngineSpec, model_dir: Path, engine_dir: Path, work_dir: Path,
             examples: Path) -> list:
    """The checkpoint and engine build steps for a generator spec, in order."""
    if spec.trtllm is None:
        raise ValueError(f"{spec.name} is not a TensorRT-LLM spec")
    if spec.blocked:
        raise ValueError(f"{spec.name} cannot be built: {spec.blocked}")
    opts = spec.trtllm
    checkpoint = checkpoint_dir(work_dir)
    if opts.qformat is None:
        convert = (PYTHON, str(Path(examples) / opts.convert_script), "--model_dir", str(model_dir),
                   "--output_dir", str(checkpoint), "--dtype", opts.dtype, "--tp_size", str(opts.tp_size))
        first = Step(f"convert ({opts.dtype})", convert)
    else:
        quantize = [PYTHON, str(Path(examples) / QUANTIZE_SCRIPT), "--model_dir", str(model_dir),
                    "--output_dir", str(checkpoint), "--dtype", opts.dtype, "--qformat", opts.qformat]
        for flag, value in (("--awq_block_size", opts.awq_block_size), ("--kv_cache_dtype", opts.kv_cache_dtype),
                            ("--calib_size", opts.calib_size), ("--calib_dataset", opts.calib_dataset)):
            if value is not None:
                quantize += [flag, str(value)]
        quantize += ["--tp_size", str(opts.tp_size)]
        first = Step(f"quantize ({quantisation(spec)})", tuple(quantize))
    build = ("trtllm-build", "--checkpoint_dir", str(checkpoint), "--output_dir", str(Path(engine_dir) / ENGINE_SUBDIR),
             "--max_batch_size", str(engine.max_batch_size), "--max_input_len", str(engine.max_input_len),
             "--max_seq_len", str(engine.max_seq_len), "--max_num_tokens", str(opts.max_num_tokens),
             "--kv_cache_type", "paged", "--use_paged_context_fmha", "enable",
             "--remove_input_padding", "enable", "--gpt_attention_plugin", "auto", "--gemm_plugin", "auto",
             "--workers", str(opts.tp_size))
    return [first, Step("trtllm-build", build)]


# Quantisations with INT4 or INT8 weights (or INT8 KV cache / SmoothQuant). TensorRT-LLM 1.0's builder.py refuses
# those when the GPU's SM version is in [100, 120) (B200, GB200: "INT8/INT4 quantization is not supported on
# SM>=100"), after the checkpoint has been calibrated for an hour; this tool refuses them up front instead.
INT_QFORMATS = frozenset({"w4a8_awq", "int4_awq", "w4a16_awq", "int8_sq", "int8_wo", "int4_wo", "w4a8_mxfp4_fp8",
                          "w4a8_gptq", "int4_gptq"})
INT_KV_CACHE = frozenset({"int8"})
REFUSING_SM = range(100, 120)


def sm_refusal(spec: BuildSpec, sm: Optional[int]) -> Optional[str]:
    """Why TensorRT-LLM 1.0 will not build this spec on a GPU of SM version ``sm`` (e.g. 100 for B200), or None."""
    opts = spec.trtllm
    if sm is None or sm not in REFUSING_SM or opts is None:
        return None
    if opts.qformat in INT_QFORMATS or opts.kv_cache_dtype in INT_KV_CACHE:
        return (f"{spec.name} ({quantisation(spec)}) cannot be built on this GPU (SM {sm}): TensorRT-LLM "
                f"{TRTLLM_VERSION}'s builder refuses INT4/INT8 quantisation on SM 100-119 (B200, GB200). Build the "
                "FP8 spec (the default: qwen3-32b-fp8 / qwen3-4b-fp8) or, on Blackwell, an nvfp4 one instead")
    return None


def detect_sm(device: int = 0) -> Optional[int]:
    """The SM version of a GPU (``nvidia-smi --query-gpu=compute_cap``: "10.0" -> 100), None without one."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(device), "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        major, minor = out.splitlines()[0].split(".")
        return int(major) * 10 + int(minor)
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def quantisation(spec: BuildSpec) -> str:
    """What the manifest records, e.g. ``w4a8_awq, kv fp8``."""
    opts = spec.trtllm
    weights = opts.qformat or opts.dtype
    return f"{weights}, kv {opts.kv_cache_dtype}" if opts.kv_cache_dtype else weights
