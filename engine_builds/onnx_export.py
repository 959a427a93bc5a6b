"""ONNX export of the embed and rerank models: the graphs of :mod:`engine_builds.graphs`, with the tensor names of
the Triton contract, dynamic batch and sequence axes, and the engine folder the serving stack reads.

The exported folder is a complete engine folder for the ``trtllm`` profile except for the plan: ``model.onnx``
(+ ``model.onnx.data`` for models over 2 GB), ``engine.json`` (what the BLS tokenizers read), the tokenizer files
and ``manifest.json``. ``engine_builds/build.py plan`` then adds ``model.plan`` next to them.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from ragstack.contracts import tensors as contracts
from ragstack.governance.manifest import TOKENIZER_FILES, update_manifest

from engine_builds.specs import BuildSpec
from engine_builds.tools import python_versions

ONNX_FILE = "model.onnx"
OPSET = 18
# protobuf cannot hold a model over 2 GiB: larger weights go to model.onnx.data beside it.
_EXTERNAL_DATA_BYTES = 1 << 30


def load_graph(spec: BuildSpec, model_dir: Path):
    """The export module for a model folder, float32, in eval mode."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from engine_builds.graphs import EmbedGraph, RerankGraph

    engine = spec.engine_spec(model_dir)
    # Eager attention: it takes the additive bias as given (see graphs.attention_bias).
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if spec.kind == "embed":
        graph = EmbedGraph(AutoModel.from_pretrained(str(model_dir), **kwargs), engine)
    elif spec.kind == "rerank":
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        yes_id, no_id = tokenizer.convert_tokens_to_ids(["yes", "no"])
        if tokenizer.unk_token_id in (yes_id, no_id) or None in (yes_id, no_id):
            raise ValueError(f"{model_dir}: the tokenizer has no single tokens 'yes' and 'no'")
        graph = RerankGraph(AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs), engine, yes_id, no_id)
    else:
        raise ValueError(f"{spec.name}: only embed and rerank models export to ONNX (generate uses TensorRT-LLM)")
    return graph.eval(), engine


def export_onnx(graph, kind: str, onnx_path: Path) -> Path:
    """Export ``graph`` with the contract's input and output names and dynamic ``batch`` / ``sequence`` axes."""
    import torch

    contract = contracts.ENGINES[kind]
    input_names = [t.name for t in contract.inputs]
    output_names = [t.name for t in contract.outputs]
    # Example inputs: a left-padded batch of 2 (a batch of 1 or length 1 would let torch.export specialise).
    ids = torch.full((2, 16), 3, dtype=torch.int32)
    mask = torch.ones((2, 16), dtype=torch.int32)
    mask[1, :5] = 0
    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1)
    dynamic = {name: {0: batch, 1: sequence} for name in input_names}
    with torch.no_grad(), warnings.catch_warnings():
        # Both inputs share the batch and sequence axes on purpose; the exporter notes it once per input.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(graph, (ids, mask), None, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True)
    _free_output_names(program.model, output_names)
    size = sum(p.numel() * p.element_size() for p in graph.parameters())
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(onnx_path), external_data=size > _EXTERNAL_DATA_BYTES)
    return onnx_path


def _free_output_names(model, output_names) -> None:
    """Rename internal values that took an output's name (the exporter calls the embedding lookup 'embedding')."""
    outputs = set(id(v) for v in model.graph.outputs)
    for node in model.graph:
        for value in node.outputs:
            if value.name in output_names and id(value) not in outputs:
                value.name = f"{value.name}_internal"


def copy_tokenizer(model_dir: Path, out_dir: Path) -> list:
    """Copy the tokenizer files: the BLS models tokenize from the engine folder."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, Path(out_dir) / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise FileNotFoundError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
    return copied


def export(spec: BuildSpec, model_dir: Path, out_dir: Path) -> Path:
    """Export ``model_dir`` into the engine folder ``out_dir`` and write its manifest. Returns the ONNX path."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    graph, engine = load_graph(spec, model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(graph, spec.kind, out_dir / ONNX_FILE)
    copy_tokenizer(model_dir, out_dir)
    engine.write(out_dir)
    update_manifest(out_dir, kind=spec.kind, name=engine.name, step="onnx", quantisation="none (fp32 ONNX)",
                    args={"spec": spec.name, "source": spec.source, "model_dir": model_dir, "opset": OPSET,
                          "dim": engine.dim, "max_length": engine.max_length},
                    tools=python_versions())
    return onnx_path


def onnx_session(onnx_path: Path):
    """An ONNX Runtime CPU session for the exported graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def reference_engine(spec: BuildSpec, model_dir: Path, scratch: Path):
    """The CPU reference engine (:mod:`ragstack.engines`) for ``model_dir``, served with the spec's engine.json.

    A hub folder has no engine.json: the engine then reads a scratch folder of links to the model files plus the
    spec's engine.json, so the export is checked against exactly what the reference profile would serve.
    """
    from ragstack.engines.embedding import EmbeddingEngine
    from ragstack.engines.reranking import RerankEngine

    model_dir = Path(model_dir)
    folder = model_dir
    if not (model_dir / "engine.json").is_file() or spec.engine:
        folder = Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for item in model_dir.iterdir():
            if item.name != "engine.json" and not (folder / item.name).exists():
                (folder / item.name).symlink_to(item.resolve())
        spec.engine_spec(model_dir).write(folder)
    return (EmbeddingEngine if spec.kind == "embed" else RerankEngine)(folder)


VERIFY_BATCHES = (1, 3, 8)
VERIFY_LENGTHS = (5, 37, 130)


def verify(session, reference, vocab_size: int, max_length: int, *, seed: int = 0) -> float:
    """Largest |ONNX - reference| over left-padded batches of every size x length in VERIFY_*.

    Rows get random real lengths, so each batch mixes padded and unpadded rows; the reference returns [B] or
    [B, dim], the graph [B, 1] or [B, dim].
    """
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in VERIFY_BATCHES:
        for length in VERIFY_LENGTHS:
            length = min(length, max_length)
            ids = rng.integers(0, vocab_size, size=(batch, length)).astype(np.int32)
            mask = np.ones_like(ids)
            for row in range(1, batch):                      # row 0 stays full length
                mask[row, : rng.integers(0, length)] = 0
            ids[mask == 0] = 0
            got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            want = np.asarray(reference(ids, mask), dtype=np.float32).reshape(got.shape)
            worst = max(worst, float(np.abs(got - want).max()))
    return worst
