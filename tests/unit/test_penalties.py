"""TensorRT-LLM's penalty inputs: each one's effect on the logits against a hand computation, their validation,
their tensors (contract names both ways), the per-task policy values, and the engine honouring them per request."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ragstack.contracts.tensors import GENERATE
from ragstack.contracts.errors import InvalidInput
from ragstack.engines.generation.sampling import (apply_penalties, check_penalty_params, has_penalties, suppress_end,
                                          token_counts)
from ragstack.governance.policy import RuntimePolicy
from ragstack.contracts.trtllm import PENALTY_INPUTS, generate_inputs, parse_generate_inputs

REPO = Path(__file__).resolve().parents[2]
# vocab of 5; token 0 seen twice, token 1 once, tokens 2-4 never
LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])
COUNTS = token_counts([0, 1, 0], 5)


def test_counts():
    assert COUNTS.tolist() == [2.0, 1.0, 0.0, 0.0, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    out = apply_penalties(LOGITS, COUNTS, repetition_penalty=2.0)
    assert out.tolist() == pytest.approx([2.0 / 2, -1.0 * 2, 0.5, -3.0, 1.0])


def test_presence_penalty_subtracts_once_per_seen_token():
    out = apply_penalties(LOGITS, COUNTS, presence_penalty=0.5)
    assert out.tolist() == pytest.approx([2.0 - 0.5, -1.0 - 0.5, 0.5, -3.0, 1.0])


def test_frequency_penalty_subtracts_per_occurrence():
    out = apply_penalties(LOGITS, COUNTS, frequency_penalty=0.25)
    assert out.tolist() == pytest.approx([2.0 - 2 * 0.25, -1.0 - 1 * 0.25, 0.5, -3.0, 1.0])


def test_penalties_combine_in_tensorrt_llm_order():
    # repetition first, then presence, then frequency
    out = apply_penalties(LOGITS, COUNTS, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == pytest.approx([1.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 0.5, -3.0, 1.0])
    assert LOGITS.tolist() == [2.0, -1.0, 0.5, -3.0, 1.0]     # input untouched


def test_negative_presence_penalty_rewards_seen_tokens():
    assert apply_penalties(LOGITS, COUNTS, presence_penalty=-1.0)[1].item() == pytest.approx(0.0)


def test_min_tokens_masks_the_end_token_until_enough_were_generated():
    end = 4
    assert suppress_end(LOGITS.clone(), [end], generated=2, min_tokens=3)[end].item() == -math.inf
    assert suppress_end(LOGITS.clone(), [end], generated=3, min_tokens=3)[end].item() == 1.0
    assert suppress_end(LOGITS.clone(), [end], generated=0, min_tokens=0).tolist() == LOGITS.tolist()


def test_len_penalty_has_no_effect_at_beam_width_one():
    assert not has_penalties(len_penalty=1.5)
    assert has_penalties(repetition_penalty=1.1) and has_penalties(min_tokens=1)
    assert not has_penalties()


@pytest.mark.parametrize("kwargs", [dict(repetition_penalty=0.0), dict(repetition_penalty=float("nan")),
                                    dict(presence_penalty=float("inf")), dict(min_tokens=-1),
                                    dict(min_tokens=1.5), dict(len_penalty=True)])
def test_bad_penalties_are_invalid(kwargs):
    values = {**PENALTY_INPUTS, **kwargs}
    with pytest.raises(InvalidInput):
        check_penalty_params(**values)


def test_contract_declares_penalties_with_tensorrt_llm_types():
    types = {name: GENERATE.input(name).dtype for name in PENALTY_INPUTS}
    assert types == {"repetition_penalty": "TYPE_FP32", "presence_penalty": "TYPE_FP32",
                     "frequency_penalty": "TYPE_FP32", "min_tokens": "TYPE_INT32", "len_penalty": "TYPE_FP32"}
    for profile in ("reference", "trtllm"):
        text = (REPO / "model_repository" / profile / "generate" / "config.pbtxt").read_text()
        for name in PENALTY_INPUTS:
            assert f'name: "{name}"' in text, (profile, name)


def test_penalty_tensors_round_trip_and_neutral_values_are_not_sent():
    inputs = generate_inputs([1, 2, 3], 8, 0, 0, penalties={"repetition_penalty": 1.3, "min_tokens": 4,
                                                             "presence_penalty": 0.0})
    assert "presence_penalty" not in inputs
    assert inputs["repetition_penalty"].dtype == np.float32 and inputs["min_tokens"].dtype == np.int32
    parsed = parse_generate_inputs(inputs)
    assert parsed["repetition_penalty"] == pytest.approx(1.3) and parsed["min_tokens"] == 4
    assert parsed["presence_penalty"] == 0.0 and parsed["frequency_penalty"] == 0.0
    with pytest.raises(InvalidInput):
        generate_inputs([1], 8, 0, 0, penalties={"no_repeat_ngram_size": 3})


def test_policy_penalties_per_task():
    base = RuntimePolicy.load(REPO / "config" / "runtime_policy.json")
    data = {"version": 1, "default_task": "answer",
            "tasks": {"answer": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "repetition_penalty": 1.2,
                                 "min_tokens": 2, "abstain_below_rerank": 0.1},
                      "judge": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64}},
            "thresholds": base.thresholds.as_dict(), "events": {"log_path": None}}
    policy = RuntimePolicy.from_dict(data)
    assert policy.task("answer").penalties() == {"repetition_penalty": 1.2, "presence_penalty": 0.0,
                                                 "frequency_penalty": 0.0, "min_tokens": 2, "len_penalty": 0.0}
    assert policy.task("answer").abstain_below_rerank == 0.1
    assert policy.task("judge").penalties() == PENALTY_INPUTS and policy.task("judge").abstain_below_rerank is None
    data["tasks"]["judge"]["repetition_penalty"] = 0
    with pytest.raises(ValueError, match="repetition_penalty"):
        RuntimePolicy.from_dict(data)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from ragstack.engines.generation import InflightBatchingEngine

    built = REPO / "build" / "models" / "tiny" / "generate"
    if not (built / "engine.json").is_file():
        from ragstack_dev.model_builders import build_tiny
        built = build_tiny(tmp_path_factory.mktemp("models") / "tiny") / "generate"
    eng = InflightBatchingEngine(built, max_batch_size=4, cancel_poll_s=0.0)
    yield eng
    eng.shutdown(10)


def _run(engine, **kwargs):
    from ragstack.engines.generation import GenerationRequest

    req = GenerationRequest(input_ids=[5, 6, 7, 5], max_new_tokens=12, end_id=-1, temperature=0.0,
                            exclude_input_in_output=True, **kwargs)
    return engine.generate(req, timeout=60).output_ids


def test_engine_applies_penalties_per_request_in_one_batch(engine):
    """A strong presence penalty forbids any repeat (prompt or output) under greedy decoding, for the request
    that asks for it, while an unpenalised request in the same batch decodes as it does alone."""
    from ragstack.engines.generation import GenerationRequest

    plain_alone = _run(engine)
    reqs = [GenerationRequest(input_ids=[5, 6, 7, 5], max_new_tokens=12, end_id=-1, temperature=0.0,
                              exclude_input_in_output=True, **kw)
            for kw in ({}, {"presence_penalty": 1e4})]
    handles = [engine.submit(r, lambda *a: None) for r in reqs]
    plain, penalised = [h.wait(60).output_ids for h in handles]
    assert plain == plain_alone
    assert len(set(penalised)) == len(penalised) and not set(penalised) & {5, 6, 7}


def test_engine_min_tokens_holds_off_the_end_token(engine):
    out = _run(engine)
    end = out[0]                        # make the first greedy token the "end": without min_tokens it stops at once
    from ragstack.engines.generation import GenerationRequest

    req = GenerationRequest(input_ids=[5, 6, 7, 5], max_new_tokens=12, end_id=end, temperature=0.0,
                            exclude_input_in_output=True)
    assert engine.generate(req, timeout=60).num_output_tokens == 0
    req.min_tokens = 3
    res = engine.generate(req, timeout=60)
    assert res.num_output_tokens >= 3 and end not in res.output_ids[:3]
