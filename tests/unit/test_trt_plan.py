"""The trtllm profile's plan runner (ragstack/engines/trt_plan.py) against a fake of TensorRT 10's Python runtime, on CPU.

The fake keeps TensorRT's calling discipline: tensors are found by name (num_io_tensors / get_tensor_name /
get_tensor_mode), input shapes must lie inside optimization profile 0 (set_input_shape returns False otherwise),
outputs get their shapes from the inputs', every I/O tensor needs an address (set_tensor_address) before
execute_async_v3, and the "kernel" reads its inputs from and writes its outputs to those raw addresses, so a
buffer bound wrongly gives wrong numbers, not a pass.
"""
import ctypes
import enum
import json

import numpy as np
import pytest

from ragstack.contracts import tensors as contracts
from ragstack.contracts.errors import InvalidInput
from ragstack.engines.trt_plan import HostDevice, PlanError, PlanRunner, TritonPlanModel, check_tensorrt_version
from tests.unit.fake_pb import FakePb, Request

DIM = 6


class FakeTrt:
    """The names of the ``tensorrt`` module the runner uses (TensorRT 10.x)."""
    __version__ = "10.11.0.33"

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    float32, float16, int32, int64, bool = "float32", "float16", "int32", "int64", "bool"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    def __init__(self, tensors=None, profile=((1, 1), (8, 64), (4, 32)), plan_ok=True, fail_execute=False,
                 kernel=None):
        self.tensors = tensors or {"input_ids": ("INPUT", "int32"), "attention_mask": ("INPUT", "int32"),
                                   "embedding": ("OUTPUT", "float32")}
        self.profile = profile          # (min, opt, max) as (batch, length)
        self.plan_ok = plan_ok
        self.fail_execute = fail_execute
        self.kernel = kernel or _embed_kernel
        self.executions = []            # batch size of every execute_async_v3
        fake = self

        class Runtime:
            def __init__(self, logger):
                assert isinstance(logger, FakeTrt.Logger)

            def deserialize_cuda_engine(self, plan):
                assert isinstance(plan, bytes)
                return FakeEngine(fake) if fake.plan_ok and plan == b"PLAN" else None

        self.Runtime = Runtime


class FakeEngine:
    def __init__(self, trt):
        self.trt = trt
        self.names = list(trt.tensors)
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = 1

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode[self.trt.tensors[name][0]]

    def get_tensor_dtype(self, name):
        return self.trt.tensors[name][1]

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0 and self.get_tensor_mode(name) == FakeTrt.TensorIOMode.INPUT
        return [tuple(s) for s in self.trt.profile]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine = engine
        self.shapes, self.addresses = {}, {}

    def set_input_shape(self, name, shape):
        (lo_b, lo_l), _, (hi_b, hi_l) = self.engine.trt.profile
        if len(shape) != 2 or not (lo_b <= shape[0] <= hi_b and lo_l <= shape[1] <= hi_l):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        batch = self.shapes.get("input_ids", (-1, -1))[0]
        return (batch, DIM) if name == "embedding" else (batch, 1)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle):
        trt = self.engine.trt
        assert set(self.addresses) == set(trt.tensors), "every I/O tensor needs an address"
        if trt.fail_execute:
            return False
        batch, length = self.shapes["input_ids"]
        ids = _view(self.addresses["input_ids"], np.int32, (batch, length))
        mask = _view(self.addresses["attention_mask"], np.int32, (batch, length))
        for name, (mode, dtype) in trt.tensors.items():
            if mode == "OUTPUT":
                out = _view(self.addresses[name], np.dtype(dtype), self.get_tensor_shape(name))
                out[...] = trt.kernel(name, ids, mask)
        trt.executions.append(batch)
        return True


def _view(address, dtype, shape):
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _embed_kernel(name, ids, mask):
    """Row i: [sum of real ids, number of real tokens, first id, ...]: depends on every input and on the row."""
    out = np.zeros((ids.shape[0], DIM), np.float32)
    out[:, 0] = (ids * mask).sum(axis=1)
    out[:, 1] = mask.sum(axis=1)
    out[:, 2] = ids[:, 0]
    return out


def _expected(ids, mask):
    return _embed_kernel("embedding", ids, mask)


def _batch(rows, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1000, size=(rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, : length // 3] = 0
    return ids, mask


def runner(trt=None, contract=contracts.EMBED):
    return PlanRunner(trt or FakeTrt(), b"PLAN", contract, HostDevice())


# ------------------------------------------------------------------------------------------------ load
def test_profile_is_read_from_the_plan():
    r = runner(FakeTrt(profile=((1, 2), (8, 64), (4, 30))))
    assert (r.profile.min_batch, r.profile.max_batch, r.profile.min_len, r.profile.max_len) == (1, 4, 2, 30)
    assert set(r.inputs) == {"input_ids", "attention_mask"} and set(r.outputs) == {"embedding"}


def test_a_plan_that_does_not_deserialize_says_why():
    with pytest.raises(PlanError, match="could not deserialize.*TensorRT version"):
        runner(FakeTrt(plan_ok=False))


@pytest.mark.parametrize("tensors, message", [
    ({"input_ids": ("INPUT", "int32"), "embedding": ("OUTPUT", "float32")}, "no tensor 'attention_mask'"),
    ({"input_ids": ("INPUT", "int32"), "attention_mask": ("INPUT", "int64"), "embedding": ("OUTPUT", "float32")},
     "'attention_mask' is int64"),
    ({"input_ids": ("INPUT", "int32"), "attention_mask": ("INPUT", "int32"), "embedding": ("OUTPUT", "float16")},
     "'embedding' is float16"),
    ({"input_ids": ("INPUT", "int32"), "attention_mask": ("OUTPUT", "int32"), "embedding": ("OUTPUT", "float32")},
     "'attention_mask' is not an"),
    ({"input_ids": ("INPUT", "int32"), "attention_mask": ("INPUT", "int32"), "token_type_ids": ("INPUT", "int32"),
      "embedding": ("OUTPUT", "float32")}, "inputs the contract does not have"),
])
def test_a_plan_that_does_not_match_the_contract_is_refused(tensors, message):
    with pytest.raises(PlanError, match=message):
        runner(FakeTrt(tensors=tensors))


def test_the_rerank_contract_is_checked_too():
    trt = FakeTrt(tensors={"input_ids": ("INPUT", "int32"), "attention_mask": ("INPUT", "int32"),
                           "score": ("OUTPUT", "float32")}, kernel=lambda n, ids, m: m.sum(axis=1, keepdims=True))
    r = runner(trt, contracts.RERANK)
    ids, mask = _batch(3, 10)
    np.testing.assert_array_equal(r.run({"input_ids": ids, "attention_mask": mask})["score"],
                                  mask.sum(axis=1, keepdims=True).astype(np.float32))
    with pytest.raises(PlanError, match="no tensor 'score'"):
        runner(FakeTrt(), contracts.RERANK)


# ------------------------------------------------------------------------------------------------- run
@pytest.mark.parametrize("rows, length", [(1, 1), (3, 17), (4, 32)])
def test_results_come_back_through_the_bound_buffers(rows, length):
    trt = FakeTrt()
    ids, mask = _batch(rows, length)
    out = runner(trt).run({"input_ids": ids, "attention_mask": mask})
    np.testing.assert_array_equal(out["embedding"], _expected(ids, mask))
    assert trt.executions == [rows]


@pytest.mark.parametrize("rows, chunks", [(5, [4, 1]), (8, [4, 4]), (11, [4, 4, 3]), (32, [4] * 8)])
def test_a_batch_over_the_profile_maximum_is_split(rows, chunks):
    """Triton's max_batch_size (32 for embed) may exceed the plan's profile: run it in profile-sized pieces."""
    trt = FakeTrt()
    ids, mask = _batch(rows, 9, seed=rows)
    out = runner(trt).run({"input_ids": ids, "attention_mask": mask})
    assert trt.executions == chunks
    np.testing.assert_array_equal(out["embedding"], _expected(ids, mask))     # rows in order


def test_a_profile_with_a_minimum_batch_above_one_is_padded_and_trimmed():
    trt = FakeTrt(profile=((2, 1), (4, 8), (4, 32)))
    ids, mask = _batch(5, 6)
    out = runner(trt).run({"input_ids": ids, "attention_mask": mask})
    assert trt.executions == [4, 2] and out["embedding"].shape == (5, DIM)
    np.testing.assert_array_equal(out["embedding"], _expected(ids, mask))


def test_a_length_outside_the_profile_is_the_callers_error():
    r = runner(FakeTrt(profile=((1, 2), (4, 8), (4, 32))))
    for length in (1, 33):
        ids, mask = _batch(2, length)
        with pytest.raises(InvalidInput, match=r"outside the plan's profile \[2, 32\]"):
            r.run({"input_ids": ids, "attention_mask": mask})


def test_inputs_of_different_shapes_are_refused():
    ids, _ = _batch(2, 8)
    with pytest.raises(InvalidInput, match="share one"):
        runner().run({"input_ids": ids, "attention_mask": np.ones((2, 7), np.int32)})


def test_inputs_are_cast_to_the_plans_dtype():
    ids, mask = _batch(2, 8)
    out = runner().run({"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
    np.testing.assert_array_equal(out["embedding"], _expected(ids, mask))


def test_an_empty_batch_does_not_run():
    trt = FakeTrt()
    out = runner(trt).run({"input_ids": np.zeros((0, 4), np.int32), "attention_mask": np.zeros((0, 4), np.int32)})
    assert out["embedding"].shape == (0,) and trt.executions == []


def test_a_failed_execution_is_an_error():
    ids, mask = _batch(2, 8)
    with pytest.raises(PlanError, match="execute_async_v3 failed"):
        runner(FakeTrt(fail_execute=True)).run({"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("built, runtime, ok", [("10.11.0", "10.11.0.33", True), ("unknown", "10.11.0.33", True),
                                                (None, "10.11.0.33", True), ("10.13.3", "10.11.0.33", False)])
def test_a_plan_from_another_tensorrt_release_is_named(built, runtime, ok):
    if ok:
        check_tensorrt_version(built, runtime)
    else:
        with pytest.raises(PlanError, match="built with TensorRT 10.13.3 but this container runs TensorRT 10.11"):
            check_tensorrt_version(built, runtime)


# ------------------------------------------------------------------------------------ the Triton model
def test_the_triton_model_pads_batches_of_requests_on_the_engines_side(tmp_path, monkeypatch):
    engine_dir = tmp_path / "embed"
    engine_dir.mkdir()
    (engine_dir / "model.plan").write_bytes(b"PLAN")
    (engine_dir / "engine.json").write_text(json.dumps({"name": "tiny", "kind": "embed", "pooling": "mean", "padding_side": "left",
                                                        "max_length": 32}))
    monkeypatch.setenv("ENGINE_PATH", str(tmp_path))
    args = {"model_config": json.dumps({"parameters": {"engine_dir": {"string_value": "embed"},
                                                       "plan_file": {"string_value": "model.plan"}}})}
    trt = FakeTrt()
    model = TritonPlanModel(args, contracts.EMBED, "embedding", trt=trt, device=HostDevice())
    a = np.array([[5, 6, 7]], np.int32)
    b = np.array([[9, 9]], np.int32)
    requests = [Request(input_ids=a, attention_mask=np.ones_like(a)), Request(input_ids=b, attention_mask=np.ones_like(b))]
    responses = model.execute(FakePb(), requests)
    assert trt.executions == [2]                                   # one plan execution for both requests
    first, second = (r.output_tensors[0].arr for r in responses)
    assert first[0, :3].tolist() == [18, 3, 5] and second[0, :3].tolist() == [18, 2, 0]   # left padding


def test_the_triton_model_says_where_the_plan_should_be(tmp_path, monkeypatch):
    (tmp_path / "embed").mkdir()
    monkeypatch.setenv("ENGINE_PATH", str(tmp_path))
    args = {"model_config": json.dumps({"parameters": {"engine_dir": {"string_value": "embed"}}})}
    with pytest.raises(PlanError, match="model.plan does not exist: build the plans"):
        TritonPlanModel(args, contracts.EMBED, "embedding", trt=FakeTrt(), device=HostDevice())
