"""The generate engine (TensorRT-LLM contract) and generate_text on a real tritonserver, tiny Qwen3 model."""
import json
import re

import jsonschema
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from ragstack.contracts.trtllm import generate_inputs, output_tokens
from tests.integration.helpers import generate_json, stream, strings

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["answer", "n"], "additionalProperties": False}
GUIDES = {
    "json_schema": (json.dumps(SCHEMA), lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    "regex": (r"[a-z]{3,8}-[0-9]{2}", lambda text: re.fullmatch(r"[a-z]{3,8}-[0-9]{2}", text) or
              pytest.fail(f"{text!r} does not match")),
    "ebnf_grammar": ('root ::= "yes" | "no" | "maybe"', lambda text: text in ("yes", "no", "maybe") or
                     pytest.fail(f"{text!r} not in the grammar")),
}


def text_inputs(prompt="What does the server return?", **kw):
    arrays = {"prompt": strings([prompt]), "max_tokens": np.array([kw.pop("max_tokens", 64)], np.int32),
              "temperature": np.array([kw.pop("temperature", 0.0)], np.float32)}
    for name, value in kw.items():
        arrays[name] = (strings([value]) if isinstance(value, str) else
                        np.array([value], {bool: np.bool_, int: np.uint64 if name == "seed" else np.int32}
                                 .get(type(value), np.float32)))
    return arrays


def one(server, **kw):
    [final] = stream(server.grpc_url, "generate_text", text_inputs(**kw))
    return {k: v.reshape(-1)[0] for k, v in final.items()}


@pytest.mark.parametrize("guide_type", sorted(GUIDES))
def test_guided_output_satisfies_its_grammar_grpc_and_http(server, guide_type):
    guide, check = GUIDES[guide_type]
    out = one(server, guide_type=guide_type, guide=guide, max_tokens=128)
    assert out["finish_reason"].decode() == "stop", out
    check(out["text"].decode())
    status, body = generate_json(server.http_url, "generate_text",
                                 {"prompt": "What does the server return?", "max_tokens": 128, "temperature": 0.0,
                                  "guide_type": guide_type, "guide": guide})
    assert status == 200, body
    assert body["text"] == out["text"].decode()                     # same request, same answer, both protocols


def test_json_guide_yields_parseable_json(server):
    finished = []
    for seed in range(6):                 # a random-weight model may never close unbounded JSON: sample a few
        out = one(server, guide_type="json", temperature=1.0, seed=seed, max_tokens=96)
        if out["finish_reason"].decode() == "stop":
            finished.append(json.loads(out["text"].decode()))
    assert finished, "no sampled JSON finished within the token cap"


def test_temperature_zero_is_deterministic(server):
    a, b = one(server, max_tokens=40), one(server, max_tokens=40)
    assert a["text"] == b["text"] and a["num_output_tokens"] == b["num_output_tokens"]


def test_seeded_sampling_is_reproducible(server):
    a, b = (one(server, max_tokens=30, temperature=1.0, top_p=0.9, seed=7) for _ in range(2))
    assert a["text"] == b["text"]


def test_streaming_yields_the_same_text_as_non_streaming(server):
    whole = one(server, max_tokens=48)["text"].decode()
    parts = stream(server.grpc_url, "generate_text", text_inputs(max_tokens=48, stream=True))
    assert len(parts) > 2                                           # tokens arrived one by one
    assert "".join(p["text"].reshape(-1)[0].decode() for p in parts) == whole
    assert parts[-1]["finish_reason"].reshape(-1)[0].decode() == "length"


def test_token_cap_is_reported(server):
    out = one(server, max_tokens=5)
    assert out["finish_reason"].decode() == "length" and out["num_output_tokens"] == 5


def test_raw_engine_speaks_the_trtllm_contract(server, tiny_models):
    from ragstack.tokenization.generation import GeneratorTokenizer

    tok = GeneratorTokenizer(tiny_models / "generate")
    ids = tok.prompt_ids("What does the server return?")
    inputs = generate_inputs(ids, 12, tok.end_id, tok.pad_id, temperature=0.0)
    [final] = stream(server.grpc_url, "generate", inputs)
    assert final["output_ids"].shape[:2] == (1, 1) and final["output_ids"].dtype == np.int32
    assert final["sequence_length"].reshape(-1)[0] == final["output_ids"].shape[-1]
    assert final["first_token_time_ns"].reshape(-1)[0] >= final["arrival_time_ns"].reshape(-1)[0]
    text = tok.decode(output_tokens(final))
    assert text == one(server, max_tokens=12)["text"].decode()       # the BLS path adds nothing
    streamed = stream(server.grpc_url, "generate", generate_inputs(ids, 12, tok.end_id, tok.pad_id, streaming=True,
                                                                     temperature=0.0))
    assert sum((output_tokens(r) for r in streamed), []) == output_tokens(final)


def test_cancelled_stream_leaves_the_server_serving(server):
    parts = stream(server.grpc_url, "generate_text", text_inputs(max_tokens=400, stream=True), cancel_after=2)
    assert len(parts) == 2
    assert one(server, max_tokens=4)["finish_reason"].decode() == "length"


def test_concurrent_requests_all_complete(server):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda i: one(server, prompt=f"question {i}", max_tokens=24), range(6)))
    assert all(o["num_output_tokens"] > 0 for o in outs)


BAD = [
    (dict(guide_type="xml", guide="<a/>"), "unknown guide_type"),
    (dict(guide_type="json_schema", guide="{not json"), "schema"),
    (dict(guide_type="json_schema", guide='{"type": "bogus"}'), ""),
    (dict(guide_type="regex", guide="([a-z"), "regex"),
    (dict(guide_type="ebnf_grammar", guide="root ::= ("), ""),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="word " * 3000), "at most"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=100000), "max_seq_len"),
    (dict(temperature=-1.0), "temperature"),
]


@pytest.mark.parametrize("kw, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_generate_input_is_invalid_arg(server, kw, message):
    # HTTP /generate carries the error class (400 = INVALID_ARG); a gRPC stream carries only the message.
    body = {"prompt": "What does the server return?", "max_tokens": 16, "temperature": 0.0, **kw}
    status, reply = generate_json(server.http_url, "generate_text", body)
    assert status == 400, reply
    assert message.lower() in reply["error"].lower() and "Traceback" not in reply["error"]
    with pytest.raises(InferenceServerException) as err:
        one(server, **kw)
    assert message.lower() in str(err.value).lower() and "Traceback" not in str(err.value)
    assert one(server, max_tokens=3)["num_output_tokens"] == 3


def test_wrong_dtype_is_rejected_by_triton(server):
    arrays = text_inputs()
    arrays["max_tokens"] = np.array([1.5], np.float32)
    with pytest.raises(InferenceServerException) as err:
        stream(server.grpc_url, "generate_text", arrays)
    assert "data-type" in str(err.value) or "datatype" in str(err.value).lower()


@pytest.fixture(scope="module")
def reference_engine(tiny_models):
    """The tiny generator in this process, for the plain reference decode (its batcher is not used)."""
    import torch

    from ragstack.engines.generation import InflightBatchingEngine

    torch.set_num_threads(2)   # as the served instance (num_threads 2): the same kernels' reduction order
    eng = InflightBatchingEngine(tiny_models / "generate", max_batch_size=1)
    yield eng
    eng.shutdown()


def test_served_guided_tokens_equal_the_plain_reference_at_c1_and_c8(server, tiny_models, reference_engine):
    """Through Triton, guided greedy decoding alone (c1) and eight requests at once (c8, three grammars mixed
    in one batch) gives exactly the tokens of a one-token-at-a-time guided decode."""
    from concurrent.futures import ThreadPoolExecutor

    from ragstack.tokenization.generation import GeneratorTokenizer
    from tests.guided_reference import reference_guided_greedy

    tok = GeneratorTokenizer(tiny_models / "generate")
    assert tok.end_id == reference_engine.spec.end_id
    kinds = sorted(GUIDES)
    cases = [(tok.prompt_ids(f"Question {i}: what does the server return?"), kinds[i % len(kinds)]) for i in range(8)]
    expected = [reference_guided_greedy(reference_engine, ids, kind, GUIDES[kind][0], 40)[0] for ids, kind in cases]

    def served(case):
        ids, kind = case
        [final] = stream(server.grpc_url, "generate", generate_inputs(ids, 40, tok.end_id, tok.pad_id, temperature=0.0,
                                                                        guide_type=kind, guide=GUIDES[kind][0]))
        return output_tokens(final)

    assert [served(c) for c in cases[:3]] == expected[:3]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(served, cases)) == expected
    for (_, kind), tokens in zip(cases, expected):
        GUIDES[kind][1](tok.decode(tokens))
