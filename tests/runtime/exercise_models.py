"""Run inside a venv made from requirements-triton-models.txt alone: import every Python model the production
image serves and run each one's core code path. Any ImportError (or a silently missing optional package) fails.

    python exercise_models.py <project root> <tiny model set folder>     (tests/unit/test_runtime_requirements.py)
"""
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

ROOT, MODELS = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(ROOT))

from tests.runtime import pb_stand_in  # noqa: E402

pb_stand_in.install()

# 1. every model file of the image imports (bls_models/ and the trtllm profile's own Python models)
model_files = sorted(ROOT.glob("bls_models/*/1/model.py")) + sorted(ROOT.glob("model_repository/trtllm/*/1/model.py"))
for path in model_files:
    spec = importlib.util.spec_from_file_location(f"model_{path.parts[-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "TritonPythonModel"), path
print(f"imported {len(model_files)} model files")

# 2. embed_text / ingest / rerank_text: tokenizers of the engine folders
from ragstack.tokenization.retrieval import EmbedTokenizer, RerankTokenizer  # noqa: E402

ids, mask = EmbedTokenizer(MODELS / "embed").encode(["Triton serves the engines"], "document")[:2]
assert len(ids) == 1
pairs = RerankTokenizer(MODELS / "rerank").encode_pairs("what serves?", ["Triton.", "Bananas."])
assert len(pairs[0]) == 2

# 3. generate_text / orchestrators: the chat template (rendered with jinja2) and detokenizing
from ragstack.tokenization.generation import GeneratorTokenizer  # noqa: E402

gen = GeneratorTokenizer(MODELS / "generate")
prompt = gen.prompt_ids("Name a colour.", system="Answer in JSON.")
assert prompt and isinstance(gen.decode(prompt), str)
detok = gen.detokenizer()
detok.push(prompt[:3])
detok.flush()
# the lean BLS tier (issue 17): tokenizing and prompting load neither transformers nor torch
assert not {"torch", "transformers"} & set(sys.modules), sorted({"torch", "transformers"} & set(sys.modules))

# 4. rag: JSON Schema validation of answers
from ragstack.pipeline import rag  # noqa: E402

schema = rag.parse_schema(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}))
assert list(rag._validator(json.dumps(schema, sort_keys=True)).iter_errors({"a": 1}))

# 5. model_manager: gRPC model-load API, protobuf config round trip, NVML for the "auto" budget
import pynvml  # noqa: E402,F401 - triton_io swallows its ImportError (then "auto" quietly becomes half the RAM)
import tritonclient.grpc as grpcclient  # noqa: E402

from ragstack.lifecycle import triton_io  # noqa: E402

repo = ROOT / "model_repository" / "trtllm"
assert triton_io.read_config("embed", [repo]).name == "embed"
assert json.loads(triton_io.config_json("generate", [1], [repo]))["name"] == "generate"
grpcclient.InferenceServerClient("127.0.0.1:1")          # builds the channel; connects lazily
assert triton_io.auto_budget_bytes() > 0

# 6. vector_index: the flat-file store
from ragstack.index import FlatFileStore  # noqa: E402

with tempfile.TemporaryDirectory() as scratch:
    FlatFileStore(Path(scratch))

# 7. the plan models' adapter (the container provides tensorrt and torch; this env must not need them to import)
from ragstack.engines.trt_plan import check_tensorrt_version  # noqa: E402

check_tensorrt_version("10.11.0", "10.11.0.33")
print("every Python model's core path ran")
