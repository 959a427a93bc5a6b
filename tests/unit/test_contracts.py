"""Every tensor a BLS model sends to or reads from an engine exists, with the same name, dtype and shape, in the
engine's config.pbtxt of BOTH profiles (reference: CPU engines; trtllm: TensorRT plans and TensorRT-LLM).

The tensors are found in the code, not listed here: every ``ta.bls_infer`` / ``ta.bls_stream`` call to an engine
in ``bls_models/*/1/model.py`` and ``ragstack/`` is read with ``ast``. A dict literal gives the input names and
dtypes (its ``.astype(np.<dtype>)``); inputs built by ``contracts.trtllm.generate_inputs`` are produced by calling it with
every option set, which gives real arrays (names, dtypes, shapes); output names come from the list the call passes.
"""
import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

from ragstack.contracts import tensors as contracts
from ragstack.contracts import trtllm as trtllm_io
from ragstack.contracts.model_config import parse

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("reference", "trtllm")
SOURCES = sorted(ROOT.glob("bls_models/*/1/model.py")) + sorted((ROOT / "ragstack").rglob("*.py")) + sorted((ROOT / "ragstack_dev").rglob("*.py"))
ENGINE_CALLS = ("bls_infer", "bls_stream")
NP_TO_TRITON = {np.dtype(np.int32): "TYPE_INT32", np.dtype(np.int64): "TYPE_INT64", np.dtype(np.uint64): "TYPE_UINT64",
                np.dtype(np.float32): "TYPE_FP32", np.dtype(np.bool_): "TYPE_BOOL", np.dtype(np.object_): "TYPE_STRING"}

# A value for every option of generate_inputs, so that every tensor it can produce is produced.
GENERATE_OPTIONS = dict(temperature=0.7, top_k=5, top_p=0.9, seed=7, streaming=True, guide_type="json_schema",
                        guide='{"type": "object"}', stop_words_list=np.array([[[5, 6], [2, -1]]], np.int32),
                        return_perf_metrics=True,
                        penalties=dict(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.1,
                                       min_tokens=2, len_penalty=0.5))


@dataclasses.dataclass
class EngineCall:
    where: str
    model: str
    inputs: dict     # name -> numpy array (when the code builds it) or numpy dtype (from .astype)
    outputs: list


def _literal_list(node, module_lists: dict, where: str) -> list:
    if isinstance(node, (ast.List, ast.Tuple)):
        return [ast.literal_eval(e) for e in node.elts]
    if isinstance(node, ast.Name) and node.id in module_lists:
        return module_lists[node.id]
    raise AssertionError(f"{where}: cannot tell the requested outputs from {ast.dump(node)}")


def _astype(node) -> np.dtype:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "astype" \
                and sub.args and isinstance(sub.args[0], ast.Attribute):
            return np.dtype(getattr(np, sub.args[0].attr))
    raise AssertionError(f"line {node.lineno}: an engine input without an explicit .astype(np.<dtype>)")


def _generate_inputs() -> dict:
    params = inspect.signature(trtllm_io.generate_inputs).parameters
    options = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
    assert options == set(GENERATE_OPTIONS), "generate_inputs changed its options: give each one a value above"
    return trtllm_io.generate_inputs([11, 12, 13], 16, 2, 0, **GENERATE_OPTIONS)


def _inputs(node, assignments: dict, where: str) -> dict:
    if isinstance(node, ast.Dict):
        return {ast.literal_eval(k): _astype(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name) and node.id in assignments:
        built = assignments[node.id]
        if isinstance(built, ast.Call) and getattr(built.func, "id", getattr(built.func, "attr", "")) == \
                "generate_inputs":
            return _generate_inputs()
    raise AssertionError(f"{where}: cannot tell the engine inputs from {ast.dump(node)[:120]}")


def engine_calls(sources=SOURCES) -> list:
    calls = []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        module_lists = {t.id: [e.value for e in n.value.elts] for n in tree.body if isinstance(n, ast.Assign)
                        and isinstance(n.value, (ast.List, ast.Tuple))
                        and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in n.value.elts)
                        for t in n.targets if isinstance(t, ast.Name)}
        funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
        # a call in a nested function (bls.generate's run(version), called under a lease) sees the names its
        # enclosing function assigned: walk the outermost functions only (their walk covers the nested ones)
        nested = {id(inner) for outer in ast.walk(tree) if isinstance(outer, funcs)
                  for inner in ast.walk(outer) if inner is not outer and isinstance(inner, funcs)}
        for func in ast.walk(tree):
            if not isinstance(func, funcs) or id(func) in nested:
                continue
            assignments = {t.id: n.value for n in ast.walk(func) if isinstance(n, ast.Assign)
                           for t in n.targets if isinstance(t, ast.Name)}
            for call in ast.walk(func):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr in ENGINE_CALLS and len(call.args) >= 4):
                    continue
                where = f"{path.name}:{call.lineno}"
                assert isinstance(call.args[1], ast.Constant), f"{where}: the model name must be a literal"
                model = call.args[1].value
                if model in contracts.ENGINES:
                    calls.append(EngineCall(where, model, _inputs(call.args[2], assignments, where),
                                            _literal_list(call.args[3], module_lists, where)))
    return calls


CALLS = engine_calls()


def _config(profile: str, model: str):
    return parse((ROOT / "model_repository" / profile / model / "config.pbtxt").read_text())


def _tensor(cfg, name: str, kind: str):
    from tritonclient.grpc import model_config_pb2 as mc

    found = [t for t in (cfg.input if kind == "input" else cfg.output) if t.name == name]
    assert found, f"{cfg.name} has no {kind} {name!r}"
    return mc.DataType.Name(found[0].data_type), tuple(found[0].dims)


def _compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def test_the_code_calls_every_engine():
    assert {c.model for c in CALLS} == set(contracts.ENGINES), [c.where for c in CALLS]


def test_engines_are_only_called_through_the_adapter():
    """Otherwise a call would escape the scan: only ragstack/triton/adapter.py builds InferenceRequests."""
    builders = [p.relative_to(ROOT).as_posix() for p in SOURCES if "InferenceRequest(" in p.read_text()]
    assert builders == ["ragstack/triton/adapter.py"]


def test_a_misspelt_tensor_is_caught(tmp_path):
    source = tmp_path / "model.py"
    source.write_text("import numpy as np\n"
                      "def run(pb, ids):\n"
                      "    return ta.bls_infer(pb, 'embed', {'input_id': ids.astype(np.int32)}, ['embeddings'])\n")
    (call,) = engine_calls([source])
    assert (call.model, list(call.inputs), call.outputs) == ("embed", ["input_id"], ["embeddings"])
    cfg = _config("trtllm", "embed")
    for name, kind in (("input_id", "input"), ("embeddings", "output")):
        with pytest.raises(AssertionError, match=f"no {kind}"):
            _tensor(cfg, name, kind)


@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{c.model}@{c.where}")
@pytest.mark.parametrize("profile", PROFILES)
def test_every_input_sent_exists_with_its_dtype_and_shape(call, profile):
    cfg = _config(profile, call.model)
    for name, value in call.inputs.items():
        dtype, dims = _tensor(cfg, name, "input")
        sent = value.dtype if isinstance(value, np.ndarray) else value
        assert NP_TO_TRITON[np.dtype(sent)] == dtype, f"{call.where}: {name} is {sent}, {profile} wants {dtype}"
        if isinstance(value, np.ndarray):      # [batch, ...]: the config's dims exclude the batch dimension
            assert cfg.max_batch_size > 0 and _compatible(value.shape[1:], dims), \
                f"{call.where}: {name} {value.shape} vs {profile} dims {dims}"


@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{c.model}@{c.where}")
def test_every_required_input_is_sent(call):
    required = {t.name for t in contracts.ENGINES[call.model].inputs if not t.optional}
    assert required <= set(call.inputs), f"{call.where} does not send {sorted(required - set(call.inputs))}"


@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{c.model}@{c.where}")
def test_every_output_read_is_the_same_in_both_profiles(call):
    for name in call.outputs:
        seen = {profile: _tensor(_config(profile, call.model), name, "output") for profile in PROFILES}
        (ref_dtype, ref_dims), (prod_dtype, prod_dims) = seen["reference"], seen["trtllm"]
        assert ref_dtype == prod_dtype and _compatible(ref_dims, prod_dims), f"{call.where}: {name} {seen}"


def test_both_profiles_declare_the_same_engine_tensors():
    """Beyond what today's code uses: a tensor of one profile is a tensor of the other, alike."""
    for model in contracts.ENGINES:
        ref, prod = _config("reference", model), _config("trtllm", model)
        for kind in ("input", "output"):
            names = [t.name for t in getattr(ref, kind)]
            assert names == [t.name for t in getattr(prod, kind)], (model, kind)
            for name in names:
                (a_type, a_dims), (b_type, b_dims) = _tensor(ref, name, kind), _tensor(prod, name, kind)
                assert a_type == b_type and _compatible(a_dims, b_dims), (model, kind, name)
        assert ref.max_batch_size == prod.max_batch_size
        assert ref.model_transaction_policy.decoupled == prod.model_transaction_policy.decoupled


class _Pb:
    """Just enough of triton_python_backend_utils for the adapter's response builders."""
    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array


class _Request:
    def __init__(self, names):
        self.names = names

    def requested_output_names(self):
        return self.names


def test_responses_carry_only_the_requested_outputs():
    """Triton 2.51's Python backend drops unrequested outputs without the GIL (a threaded stub then corrupts
    numpy reference counts and aborts the server), so the builders must not send them in the first place."""
    from ragstack.contracts import tensors as contracts
    from ragstack.triton import adapter as ta
    from ragstack.contracts.trtllm import generate_outputs

    values = generate_outputs([5, 6, 7], num_input_tokens=4, num_output_tokens=3)
    assert {"batch_index", "num_input_tokens"} <= set(values)
    requested = ta.requested_outputs(_Request(["output_ids", "sequence_length"]))
    sent = ta.output_tensors(_Pb, contracts.GENERATE, values, requested)
    assert [t.name for t in sent] == ["output_ids", "sequence_length"]
    assert sent[0].array.dtype == np.int32 and sent[0].array.tolist() == [[[5, 6, 7]]]
    # no names (Triton fills the list with every output when a client names none) or no API: everything
    for request in (_Request([]), object()):
        assert ta.requested_outputs(request) is None
    assert len(ta.output_tensors(_Pb, contracts.GENERATE, values, None)) == len(values)


# --------------------------------------------------------------------------- return_perf_metrics (issue 13)
# The outputs the pinned backend (TensorRT-LLM v1.0.0, ragstack.contracts.tensors.TRTLLM_VERSION) adds to a response when
# a request sets return_perf_metrics, with their dtypes. Source: NVIDIA/TensorRT-LLM triton_backend/docs/
# model_config.md ("Common Outputs": each says "Set the optional input `return_perf_metrics` to `true` to include
# ... in the outputs") and the dtypes of triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt.
# Triton core rejects a response that carries an output its config does not declare, so every one must be here.
BACKEND_PERF_METRIC_OUTPUTS = {
    "kv_cache_alloc_new_blocks": "TYPE_INT32",
    "kv_cache_reused_blocks": "TYPE_INT32",
    "kv_cache_alloc_total_blocks": "TYPE_INT32",
    "arrival_time_ns": "TYPE_INT64",
    "first_scheduled_time_ns": "TYPE_INT64",
    "first_token_time_ns": "TYPE_INT64",
    "last_token_time_ns": "TYPE_INT64",
    "acceptance_rate": "TYPE_FP32",
    "total_accepted_draft_tokens": "TYPE_INT32",
    "total_draft_tokens": "TYPE_INT32",
}


def test_perf_metric_outputs_are_the_full_documented_list():
    assert contracts.TRTLLM_VERSION == "1.0.0", "re-check the list above against the newly pinned backend's docs"
    assert set(contracts.PERF_METRIC_OUTPUTS) == set(BACKEND_PERF_METRIC_OUTPUTS)
    for name, dtype in BACKEND_PERF_METRIC_OUTPUTS.items():
        assert contracts.GENERATE.output(name).dtype == dtype, name


@pytest.mark.parametrize("profile", PROFILES)
def test_both_generate_configs_declare_every_perf_metric_output(profile):
    cfg = parse((ROOT / "model_repository" / profile / "generate" / "config.pbtxt").read_text())
    declared = {o.name: o for o in cfg.output}
    from tritonclient.grpc import model_config_pb2 as mc

    for name, dtype in BACKEND_PERF_METRIC_OUTPUTS.items():
        assert name in declared, f"{profile}/generate does not declare {name}"
        assert declared[name].data_type == mc.DataType.Value(dtype), name


def test_reference_engine_speaks_every_perf_metric_output():
    """The reference engine's responses carry the same perf outputs (and only what the caller requested)."""
    from ragstack.engines.generation.request import GenerationResult

    result = GenerationResult(output_ids=[1, 2], finish_reason="stop", num_input_tokens=3, num_output_tokens=2)
    perf = {name: getattr(result, name) for name in contracts.PERF_METRIC_OUTPUTS}
    outputs = trtllm_io.generate_outputs([1, 2], num_input_tokens=3, num_output_tokens=2, perf=perf)
    for name, dtype in BACKEND_PERF_METRIC_OUTPUTS.items():
        assert outputs[name].dtype == np.dtype(contracts.NP_DTYPES[dtype]) and outputs[name].shape == (1, 1), name
    assert outputs["acceptance_rate"][0, 0] == 0.0 and outputs["total_draft_tokens"][0, 0] == 0

    from ragstack.triton import adapter as ta

    class _PB:
        class Tensor:
            def __init__(self, name, arr):
                self.name, self.arr = name, arr

    sent = ta.output_tensors(_PB, contracts.GENERATE, outputs, frozenset({"output_ids", "acceptance_rate"}))
    assert sorted(t.name for t in sent) == ["acceptance_rate", "output_ids"]
