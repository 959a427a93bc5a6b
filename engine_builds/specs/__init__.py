"""Build specs: one JSON file per model in this folder, and ``sets.json`` naming the models of each model set.

A spec says what a model is served as (its ``engine.json`` fields), and how its engine is built: ``plan`` for a
TensorRT plan (embed, rerank: ONNX export, then ``trtexec``), ``trtllm`` for a TensorRT-LLM engine (generate:
checkpoint conversion or quantisation, then ``trtllm-build``). Everything else is derived, so that a number lives
in one place only:

* the optimisation profile's maximum batch is the Triton contract's ``max_batch_size``
  (:mod:`ragstack.contracts.tensors`) and its maximum length is ``engine.max_length``, which the BLS tokenizers also
  enforce;
* the TensorRT-LLM limits (``max_input_len``, ``max_seq_len``, ``max_batch_size``) are the ``engine`` fields that
  the BLS ``generate_text`` model checks budgets against.

``engine`` overrides the fields of the model folder's own ``engine.json`` when it has one (the tiny set does); a
folder from a model hub has none, so a production spec carries them all.

A spec can be ``blocked`` with the reason: its commands are never produced, and the reason is what the build
tool prints.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ragstack.governance.engine_spec import EngineSpec

SPEC_DIR = Path(__file__).resolve().parent
KINDS = ("embed", "rerank", "generate")
PRECISIONS = ("fp8", "nvfp4", "fp16")


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """How ``trtexec`` builds the plan. ``precision`` is the target (FP8 for embed, NVFP4 for rerank); FP16 is the
    fallback."""

    precision: str
    opt_batch: int = 8
    opt_length: int = 512
    workspace_mib: int = 4096
    optimization_level: int = 5
    # trtexec 10.x accepts "none" or "ampere+" ("0", as older notes write it, is not a valid value: it means "none").
    hardware_compatibility: str = "none"
    device: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"plan precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.hardware_compatibility not in ("none", "ampere+"):
            raise ValueError(f"hardware_compatibility must be none or ampere+, got {self.hardware_compatibility!r}")


@dataclasses.dataclass(frozen=True)
class TrtllmOptions:
    """How the TensorRT-LLM checkpoint and engine are made.

    ``qformat`` None converts the weights as they are (``convert_script``); otherwise ModelOpt quantises them
    through TensorRT-LLM's ``quantization/quantize.py`` (``w4a8_awq``: INT4 AWQ weights with FP8 activations).
    """

    qformat: Optional[str]
    dtype: str = "bfloat16"
    kv_cache_dtype: Optional[str] = None
    awq_block_size: Optional[int] = None
    calib_size: Optional[int] = None
    calib_dataset: Optional[str] = None
    convert_script: Optional[str] = None
    max_num_tokens: int = 4096
    tp_size: int = 1

    def __post_init__(self):
        if (self.qformat is None) == (self.convert_script is None):
            raise ValueError("trtllm needs exactly one of qformat (quantize.py) and convert_script")


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    name: str
    kind: str
    source: str
    engine: dict
    plan: Optional[PlanOptions] = None
    trtllm: Optional[TrtllmOptions] = None
    blocked: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        wants = "trtllm" if self.kind == "generate" else "plan"
        if getattr(self, wants) is None or getattr(self, "plan" if wants == "trtllm" else "trtllm") is not None:
            raise ValueError(f"{self.name}: a {self.kind} spec needs a '{wants}' section and no other")
        if "kind" in self.engine:
            raise ValueError(f"{self.name}: engine.kind comes from the spec's kind")

    def engine_spec(self, model_dir: Optional[Path] = None) -> EngineSpec:
        """The ``engine.json`` this model is served with: the folder's own, overridden by the spec's fields."""
        fields = {}
        if model_dir is not None and (Path(model_dir) / "engine.json").is_file():
            fields = dataclasses.asdict(EngineSpec.read(model_dir))
            if fields["kind"] != self.kind:
                raise ValueError(f"{model_dir} holds a {fields['kind']} model, spec {self.name} is {self.kind}")
        fields.update(self.engine)
        fields["kind"] = self.kind
        if "name" not in fields:
            raise ValueError(f"spec {self.name}: no engine fields and no engine.json in {model_dir}")
        return EngineSpec(**fields)


def _strict(cls, data: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    return cls(**data)


def load_spec(name_or_path) -> BuildSpec:
    """A spec by name (``engine_builds/specs/<name>.json``) or by path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = SPEC_DIR / f"{name_or_path}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no build spec {name_or_path!r} (specs: {', '.join(spec_names())})") from None
    if data.get("plan") is not None:
        data["plan"] = _strict(PlanOptions, data["plan"], f"{path} plan")
    if data.get("trtllm") is not None:
        data["trtllm"] = _strict(TrtllmOptions, data["trtllm"], f"{path} trtllm")
    spec = _strict(BuildSpec, data, str(path))
    if spec.name != path.stem:
        raise ValueError(f"{path}: name {spec.name!r} must match the file name")
    return spec


def spec_names() -> list:
    return sorted(p.stem for p in SPEC_DIR.glob("*.json") if p.name != "sets.json")


def model_set(name: str) -> dict:
    """``{kind: BuildSpec}`` of a model set from ``sets.json``."""
    sets = json.loads((SPEC_DIR / "sets.json").read_text())
    if name not in sets:
        raise KeyError(f"no model set {name!r} (sets: {', '.join(sorted(sets))})")
    specs = {kind: load_spec(spec) for kind, spec in sets[name].items()}
    for kind, spec in specs.items():
        if spec.kind != kind:
            raise ValueError(f"model set {name}: {kind} names spec {spec.name}, which is a {spec.kind} spec")
    return specs


def set_names() -> list:
    return sorted(json.loads((SPEC_DIR / "sets.json").read_text()))
