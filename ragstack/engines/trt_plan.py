"""Run a TensorRT plan (the embed / rerank engines of the trtllm profile) from Python.

The ``tritonserver:<yy.mm>-trtllm-python-py3`` image has no ``tensorrt_plan`` platform (its backends are
TensorRT-LLM, Python and ensemble), but it carries TensorRT's Python runtime for TensorRT-LLM. The trtllm
profile's ``embed`` and ``rerank`` are therefore Python-backend models (``model_repository/trtllm/*/1/model.py``)
that deserialize the plan with that runtime and bind device buffers: this module is their core, plain Python.

Everything TensorRT- or CUDA-specific comes in from outside, so the logic (profile checks, shapes, splitting a
batch over the profile's maximum, errors) runs and is tested on a CPU against a fake of the runtime:

* ``trt``: the ``tensorrt`` module (10.x API: ``Runtime.deserialize_cuda_engine``, ``ICudaEngine.num_io_tensors``
  / ``get_tensor_name`` / ``get_tensor_mode`` / ``get_tensor_dtype`` / ``get_tensor_profile_shape`` /
  ``num_optimization_profiles`` / ``create_execution_context``, ``IExecutionContext.set_input_shape`` /
  ``get_tensor_shape`` / ``set_tensor_address`` / ``execute_async_v3``);
* ``device``: where buffers live: :class:`TorchCudaDevice` (torch CUDA tensors, the container's torch) in
  production, :class:`HostDevice` (numpy arrays, addresses of host memory) in the tests.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

from ragstack.contracts.tensors import Contract
from ragstack.contracts.errors import InvalidInput


class PlanError(RuntimeError):
    """The plan does not fit the contract, or TensorRT refused a call."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """Optimization profile 0 of the plan: the batch and sequence bounds every input shares."""
    min_batch: int
    max_batch: int
    min_len: int
    max_len: int


# -------------------------------------------------------------------------------------------- devices
class HostDevice:
    """Buffers in host memory (numpy): for tests against a fake runtime, which reads and writes the addresses."""

    stream_handle = 0

    def to_device(self, array: np.ndarray):
        return np.ascontiguousarray(array)

    def empty(self, shape, dtype):
        return np.empty(tuple(shape), dtype=dtype)

    def address(self, buffer) -> int:
        return int(buffer.ctypes.data)

    def to_host(self, buffer) -> np.ndarray:
        return np.array(buffer, copy=True)

    def synchronize(self) -> None:
        pass


class TorchCudaDevice:
    """Buffers as torch CUDA tensors on one device, run on a stream of this model instance's own."""

    def __init__(self, torch, device_id: int = 0):
        self.torch = torch
        self.device = torch.device("cuda", device_id)
        self.stream = torch.cuda.Stream(device=self.device)
        self.stream_handle = self.stream.cuda_stream

    def to_device(self, array: np.ndarray):
        with self.torch.cuda.stream(self.stream):
            return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=False)

    def empty(self, shape, dtype):
        torch_dtype = {np.dtype(np.float32): self.torch.float32, np.dtype(np.int32): self.torch.int32,
                       np.dtype(np.float16): self.torch.float16, np.dtype(np.int64): self.torch.int64}[np.dtype(dtype)]
        with self.torch.cuda.stream(self.stream):        # allocated for, and freed after, this stream's work
            return self.torch.empty(tuple(shape), dtype=torch_dtype, device=self.device)

    def address(self, buffer) -> int:
        return int(buffer.data_ptr())

    def to_host(self, buffer) -> np.ndarray:
        return buffer.cpu().numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()


# ------------------------------------------------------------------------------------------- the runner
def numpy_dtype(trt, trt_dtype):
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int64: np.int64,
             trt.bool: np.bool_}
    if trt_dtype not in table:
        raise PlanError(f"unsupported TensorRT dtype {trt_dtype}")
    return np.dtype(table[trt_dtype])


class PlanRunner:
    """One deserialized plan and one execution context, checked against a contract at load time.

    ``run`` takes the contract's inputs as ``[batch, length]`` arrays and returns its outputs, splitting the
    batch into chunks of at most the profile's maximum batch (Triton's ``max_batch_size`` may exceed it).
    """

    def __init__(self, trt, plan: bytes, contract: Contract, device, logger=None):
        self.trt = trt
        self.contract = contract
        self.device = device
        self.runtime = trt.Runtime(logger if logger is not None else trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise PlanError(f"TensorRT {getattr(trt, '__version__', '?')} could not deserialize the {contract.name} "
                            "plan: a plan only loads in the TensorRT version (and on the GPU) it was built with; "
                            "rebuild it in the TensorRT container that matches this one (docs/gpu-deployment.md)")
        self.inputs, self.outputs = self._io_tensors()
        self.profile = self._profile()
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PlanError(f"{contract.name}: TensorRT could not create an execution context (out of GPU memory?)")

    # ------------------------------------------------------------------------------------- load checks
    def _io_tensors(self):
        trt, engine = self.trt, self.engine
        found = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            found[name] = (engine.get_tensor_mode(name), numpy_dtype(trt, engine.get_tensor_dtype(name)))
        inputs, outputs = {}, {}
        for tensors, mode, into in ((self.contract.inputs, trt.TensorIOMode.INPUT, inputs),
                                    (self.contract.outputs, trt.TensorIOMode.OUTPUT, outputs)):
            for t in tensors:
                if t.name not in found:
                    raise PlanError(f"{self.contract.name} plan has no tensor {t.name!r} (it has {sorted(found)})")
                got_mode, got_dtype = found.pop(t.name)
                if got_mode != mode:
                    raise PlanError(f"{self.contract.name} plan: {t.name!r} is not an {mode} tensor")
                if got_dtype != np.dtype(t.np_dtype):
                    raise PlanError(f"{self.contract.name} plan: {t.name!r} is {got_dtype}, the contract says "
                                    f"{np.dtype(t.np_dtype)}")
                into[t.name] = got_dtype
        extra = [n for n, (mode, _) in found.items() if mode == trt.TensorIOMode.INPUT]
        if extra:
            raise PlanError(f"{self.contract.name} plan wants inputs the contract does not have: {extra}")
        return inputs, outputs

    def _profile(self) -> Profile:
        if self.engine.num_optimization_profiles < 1:
            raise PlanError(f"{self.contract.name} plan has no optimization profile (built without dynamic shapes)")
        bounds = []
        for name in self.inputs:
            low, _opt, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
            if len(low) != 2 or len(high) != 2:
                raise PlanError(f"{self.contract.name} plan: {name!r} is not [batch, length] in the profile")
            bounds.append((low, high))
        return Profile(min_batch=max(lo[0] for lo, _ in bounds), max_batch=min(hi[0] for _, hi in bounds),
                       min_len=max(lo[1] for lo, _ in bounds), max_len=min(hi[1] for _, hi in bounds))

    # --------------------------------------------------------------------------------------------- run
    def run(self, arrays: Mapping[str, np.ndarray]) -> dict:
        arrays = {name: np.asarray(arrays[name], dtype=dtype) for name, dtype in self.inputs.items()}
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise InvalidInput(f"{self.contract.name}: inputs must share one [batch, length] shape, got "
                               f"{ {n: a.shape for n, a in arrays.items()} }")
        batch, length = next(iter(shapes))
        if not self.profile.min_len <= length <= self.profile.max_len:
            raise InvalidInput(f"{self.contract.name}: {length} tokens is outside the plan's profile "
                               f"[{self.profile.min_len}, {self.profile.max_len}]")
        if batch == 0:
            return {name: np.zeros((0,), dtype) for name, dtype in self.outputs.items()}
        parts = []
        step = self.profile.max_batch
        for start in range(0, batch, step):
            parts.append(self._run_chunk({n: a[start:start + step] for n, a in arrays.items()}))
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in self.outputs}

    def _run_chunk(self, chunk: Mapping[str, np.ndarray]) -> dict:
        ctx, device = self.context, self.device
        rows = next(iter(chunk.values())).shape[0]
        if rows < self.profile.min_batch:       # a profile whose minimum batch is above 1: pad with copies of row 0
            chunk = {n: np.concatenate([a, np.repeat(a[:1], self.profile.min_batch - rows, axis=0)])
                     for n, a in chunk.items()}
        keep = []                               # device buffers stay alive until the stream is done with them
        for name, array in chunk.items():
            if not ctx.set_input_shape(name, tuple(array.shape)):
                raise PlanError(f"{self.contract.name}: TensorRT refused input shape {array.shape} for {name!r}")
            buffer = device.to_device(array)
            keep.append(buffer)
            self._bind(name, device.address(buffer))
        out_buffers = {}
        for name, dtype in self.outputs.items():
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise PlanError(f"{self.contract.name}: output {name!r} has unresolved shape {shape}")
            out_buffers[name] = device.empty(shape, dtype)
            self._bind(name, device.address(out_buffers[name]))
        if not ctx.execute_async_v3(device.stream_handle):
            raise PlanError(f"{self.contract.name}: TensorRT execute_async_v3 failed")
        device.synchronize()
        del keep
        return {name: device.to_host(buf)[:rows] for name, buf in out_buffers.items()}

    def _bind(self, name: str, address: int) -> None:
        if not self.context.set_tensor_address(name, address):
            raise PlanError(f"{self.contract.name}: TensorRT refused the address of {name!r}")


def pad_batch(rows, pad_id: int, padding_side: str, max_len: Optional[int] = None) -> tuple:
    """``[batch, length]`` input_ids and attention_mask (INT32) from token lists, padded on ``padding_side``."""
    length = max((len(r) for r in rows), default=0)
    if max_len is not None:
        length = min(length, max_len)
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        row = list(row)[:length]
        if padding_side == "left":
            ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
        else:
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def check_tensorrt_version(built_with: Optional[str], runtime: str) -> None:
    """A plan built by another TensorRT release does not deserialize; say so before TensorRT fails obscurely.

    ``built_with`` is what the plan's manifest recorded (trtexec's banner, e.g. ``10.11.0``); unknown passes.
    """
    if not built_with or built_with == "unknown":
        return
    if built_with.split(".")[:2] != runtime.split(".")[:2]:
        raise PlanError(f"the plan was built with TensorRT {built_with} but this container runs TensorRT {runtime}: "
                        "rebuild it in the TensorRT container of the same release (tools/build_plans.sh)")


class TritonPlanModel:
    """What ``model_repository/trtllm/{embed,rerank}/1/model.py`` do: the plan behind the contract, batched by
    Triton's dynamic batcher and padded like the reference engines (``ta.execute_token_batch``)."""

    def __init__(self, args: dict, contract: Contract, output_name: str, trt=None, device=None):
        from ragstack.triton import adapter as ta
        from ragstack.governance.engine_spec import EngineSpec
        from ragstack.governance.manifest import MANIFEST_FILE, read_manifest

        params = ta.model_parameters(args)
        engine_dir = ta.resolve_engine_dir(params["engine_dir"])
        plan_path = engine_dir / params.get("plan_file", "model.plan")
        if not plan_path.is_file():
            raise PlanError(f"{plan_path} does not exist: build the plans (tools/build_plans.sh) and mount the set")
        self.spec = EngineSpec.read(engine_dir)
        if trt is None:
            import tensorrt as trt          # the container's TensorRT (the one TensorRT-LLM runs on)
        if device is None:
            import torch

            device_id = int(args.get("model_instance_device_id", 0) or 0)
            torch.cuda.set_device(device_id)
            device = TorchCudaDevice(torch, device_id)
        manifest = engine_dir / MANIFEST_FILE
        if manifest.is_file():
            plan_step = read_manifest(manifest).steps.get("plan", {})
            check_tensorrt_version(plan_step.get("tools", {}).get("tensorrt"), getattr(trt, "__version__", ""))
        self.contract, self.output_name = contract, output_name
        self.runner = PlanRunner(trt, plan_path.read_bytes(), contract, device)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.runner.run({"input_ids": input_ids, "attention_mask": attention_mask})[self.output_name]

    def execute(self, pb, requests) -> list:
        from ragstack.triton import adapter as ta

        return ta.execute_token_batch(pb, requests, self.contract, self, self.spec.padding_side, self.output_name)
