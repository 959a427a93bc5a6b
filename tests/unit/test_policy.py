"""ragstack.governance.policy: the policy file, task defaults, token/cost budgets and schema ids."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest

from ragstack.contracts.errors import InvalidInput
from ragstack.governance.policy import (COST_BUDGET_FLAG, TOKEN_BUDGET_FLAG, BudgetError, PolicyError, RuntimePolicy,
                             schema_id)

POLICY_FILE = Path(__file__).resolve().parents[2] / "config" / "runtime_policy.json"
BASE = json.loads(POLICY_FILE.read_text())
PRICES = {"price_per_1k_input_usd": 0.01, "price_per_1k_output_usd": 0.03}


def policy_with(**thresholds) -> RuntimePolicy:
    data = copy.deepcopy(BASE)
    data["thresholds"].update(thresholds)
    return RuntimePolicy.from_dict(data)


@pytest.fixture(scope="module")
def policy():
    return RuntimePolicy.load(POLICY_FILE)


# ------------------------------------------------------------------------------------------- the file
def test_policy_file_holds_the_spec_values(policy):
    t = policy.thresholds
    assert (t.max_queue_delay_us, t.max_tokens, t.max_prompt_tokens, t.max_cost_usd) == (2500, 6000, 4096, 0.10)
    assert policy.default_task == "answer"
    assert policy.task_names == ["answer", "generate_json", "judge", "quote", "rank_candidates"]
    assert policy.task("generate_json").temperature == 0.0
    assert policy.task("rank_candidates").temperature == 0.0
    judge = policy.task("judge")
    assert (judge.temperature, judge.top_p) == (0.1, 0.9)
    assert policy.source == str(POLICY_FILE)


def test_default_and_unknown_task(policy):
    assert policy.task().name == policy.task(None).name == policy.task("").name == "answer"
    with pytest.raises(InvalidInput, match=r"unknown task 'summarise': valid tasks are answer, generate_json, "
                                           r"judge, quote, rank_candidates"):
        policy.task("summarise")


def _mutate(path, value):
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    (("tasks", "judge", "temprature"), 0.2, r"tasks\.judge: unknown key\(s\) tasks\.judge\.temprature"),
    (("tasks", "judge", "temperature"), 2.5, r"tasks\.judge\.temperature: 2\.5 is out of range \[0, 2\]"),
    (("tasks", "judge", "temperature"), -0.1, r"tasks\.judge\.temperature: -0\.1 is out of range"),
    (("tasks", "judge", "top_p"), 0, r"tasks\.judge\.top_p: 0 is out of range \(0, 1\]"),
    (("tasks", "judge", "top_p"), 1.01, r"tasks\.judge\.top_p"),
    (("tasks", "answer", "max_tokens"), -5, r"tasks\.answer\.max_tokens: -5 is out of range"),
    (("tasks", "answer", "max_tokens"), 6000, r"tasks\.answer\.max_tokens: 6000 is out of range \[1, 5999\]"),
    (("tasks", "answer", "max_tokens"), 12.5, r"tasks\.answer\.max_tokens: must be an integer"),
    (("tasks", "answer", "max_tokens"), KeyError, r"tasks\.answer: missing key\(s\) tasks\.answer\.max_tokens"),
    (("tasks", "answer", "temperature"), True, r"tasks\.answer\.temperature: must be a number"),
    (("tasks", "Bad-Name"), {"temperature": 0, "top_p": 1, "max_tokens": 5}, r"tasks\.Bad-Name: task names"),
    (("tasks",), {}, r"tasks: must define at least one task"),
    (("default_task",), "summarise", r"default_task: 'summarise' is not one of the tasks"),
    (("default_task",), KeyError, r"top level: missing key\(s\) default_task"),
    (("extra",), 1, r"top level: unknown key\(s\) extra"),
    (("version",), 2, r"version: 2 is not supported"),
    (("thresholds", "max_cost_usd"), -0.1, r"thresholds\.max_cost_usd: -0\.1 is out of range"),
    (("thresholds", "max_queue_delay_us"), -1, r"thresholds\.max_queue_delay_us"),
    (("thresholds", "max_prompt_tokens"), 6000, r"thresholds\.max_prompt_tokens: 6000 leaves no completion"),
    (("thresholds", "max_tokens"), KeyError, r"thresholds: missing key\(s\) thresholds\.max_tokens"),
    (("thresholds", "cost_breach_action"), "ignore", r"cost_breach_action: 'ignore' is not one of reject"),
    (("events", "webhook_url"), "ftp://x", r"events\.webhook_url: must be an http\(s\) URL"),
    (("events", "webhook_timeout_s"), 0, r"events\.webhook_timeout_s: 0 is out of range"),
])
def test_validation_names_the_field(path, value, message):
    with pytest.raises(PolicyError, match=message):
        RuntimePolicy.from_dict(_mutate(path, value), source="p.json")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        RuntimePolicy.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"tasks": ')
    with pytest.raises(PolicyError, match=r"bad\.json: not valid JSON"):
        RuntimePolicy.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(_mutate(("tasks", "judge", "top_p"), 2)))
    with pytest.raises(PolicyError, match=r"wrong\.json: tasks\.judge\.top_p"):
        RuntimePolicy.load(wrong)


def test_sampling_uses_task_defaults_and_checks_overrides(policy):
    judge = policy.task("judge")
    assert judge.sampling() == {"max_tokens": judge.max_tokens, "temperature": 0.1, "top_p": 0.9, "top_k": 0}
    assert judge.sampling(max_tokens=10, temperature=0.5)["temperature"] == 0.5
    with pytest.raises(InvalidInput, match=r"max_tokens must be in \[1, 512\] for task 'judge'"):
        judge.sampling(max_tokens=513)
    with pytest.raises(InvalidInput, match="top_p"):
        judge.sampling(top_p=0.0)
    with pytest.raises(InvalidInput, match="temperature"):
        judge.sampling(temperature=3)


# --------------------------------------------------------------------------------------- token budget
def test_token_budget_edges(policy):
    policy.check_token_budget(4096, 1904)              # exactly at both limits
    policy.check_token_budget(0, 6000 - 1)
    with pytest.raises(BudgetError) as e:
        policy.check_token_budget(4097, 10)
    assert e.value.flag == TOKEN_BUDGET_FLAG == "token_budget_overrun"
    assert "max_prompt_tokens 4096" in str(e.value) and e.value.details["limit"] == 4096
    assert isinstance(e.value, InvalidInput)
    with pytest.raises(BudgetError, match=r"prompt 4000 \+ max_tokens 2001 = 6001 tokens") as e:
        policy.check_token_budget(4000, 2001)
    assert e.value.flag == TOKEN_BUDGET_FLAG and e.value.details["limit"] == 6000
    with pytest.raises(InvalidInput, match="prompt_tokens must be a non-negative integer"):
        policy.check_token_budget(-1, 10)
    policy.check_token_budget(np.int64(100), np.int32(100))   # values straight out of tensors


def test_trim_contexts_keeps_the_best_prefix_that_fits(policy):
    # prompt budget for 1024 completion tokens: min(4096, 6000 - 1024) = 4096; 4096 - 96 fixed = 4000
    assert policy.prompt_budget(1024) == 4096
    assert policy.trim_contexts([1000, 1000, 1000, 1000, 1000], 96, 1024) == 4
    assert policy.trim_contexts([1000, 1000, 1000, 1001], 96, 1024) == 3
    # the combined limit binds when max_tokens is large: 6000 - 3000 = 3000 prompt tokens
    assert policy.prompt_budget(3000) == 3000
    assert policy.trim_contexts([1000, 1000, 1000], 0, 3000) == 3
    assert policy.trim_contexts([1000, 1000, 1000], 1, 3000) == 2
    # a long top-ranked context is not skipped in favour of shorter lower-ranked ones
    assert policy.trim_contexts([5000, 10, 10], 100, 100) == 0
    assert policy.trim_contexts([], 100, 100) == 0
    # fixed part alone over budget: nothing fits, and the budget check then rejects
    assert policy.trim_contexts([10], 4200, 100) == 0
    with pytest.raises(BudgetError):
        policy.check_token_budget(4200, 100)


def test_trimmed_prompt_always_passes_the_budget_check(policy):
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = rng.integers(1, 900, size=rng.integers(0, 12)).tolist()
        fixed, max_tokens = int(rng.integers(0, 1500)), int(rng.integers(1, 3000))
        keep = policy.trim_contexts(counts, fixed, max_tokens)
        policy.check_token_budget(fixed + sum(counts[:keep]), max_tokens)
        if keep < len(counts):  # one more would not have fitted
            with pytest.raises(BudgetError):
                policy.check_token_budget(fixed + sum(counts[:keep + 1]), max_tokens)


# ----------------------------------------------------------------------------------------------- cost
def test_cost_from_manifest_prices(policy):
    assert policy.cost_usd(1000, 1000, PRICES) == pytest.approx(0.04)
    assert policy.cost_usd(2500, 500, PRICES) == pytest.approx(0.025 + 0.015)
    assert policy.cost_usd(0, 0, PRICES) == 0.0
    with pytest.raises(PolicyError, match="price_per_1k_output_usd"):
        policy.cost_usd(1, 1, {"price_per_1k_input_usd": 0.01})
    with pytest.raises(PolicyError, match="price_per_1k_input_usd"):
        policy.cost_usd(1, 1, {"price_per_1k_input_usd": -1, "price_per_1k_output_usd": 0.1})


def test_cost_decision_serve_and_alert():
    policy = policy_with(cost_breach_action="serve_and_alert")
    ok = policy.check_cost(0.10)   # at the limit: no alert
    assert not ok.alert and ok.flag is None
    # 4000 prompt + 2000 completion at these prices: 0.04 + 0.06 = 0.10 exactly (rounding keeps it there)
    assert not policy.check_cost(policy.cost_usd(4000, 2000, PRICES)).alert
    over = policy.check_cost(0.1000001)
    assert over.alert and over.flag == COST_BUDGET_FLAG and over.limit_usd == 0.10


def test_cost_decision_reject():
    policy = policy_with(cost_breach_action="reject")
    assert not policy.check_cost(0.05).alert
    with pytest.raises(BudgetError, match=r"worst-case cost \$0\.150000 is over the per-request limit \$0\.10") as e:
        policy.check_cost(0.15)
    assert e.value.flag == "cost_budget_exceeded" and e.value.details == {"cost_usd": 0.15, "limit_usd": 0.10}


def test_queue_delay_threshold(policy):
    assert not policy.queue_delay_exceeded(2500)
    assert policy.queue_delay_exceeded(2500.5)


# ------------------------------------------------------------------------------------------ schema id
def test_schema_id_is_stable_across_spelling():
    a = '{"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}'
    b = '{\n  "properties":{"a":{"type":"string"},\n "b":{"type":"integer"}},"type":"object"}'
    c = {"properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "type": "object"}
    assert schema_id(a) == schema_id(b) == schema_id(c) == schema_id(a.encode())
    assert len(schema_id(a)) == 16 and int(schema_id(a), 16) >= 0
    assert schema_id({"type": "object", "properties": {"a": {"type": "number"}}}) != schema_id(c)
    # sha256 of the canonical text, computed independently
    import hashlib
    assert schema_id({"b": 1, "a": [1, "é"]}) == hashlib.sha256('{"a":[1,"é"],"b":1}'.encode()).hexdigest()[:16]


def test_schema_id_rejects_non_json():
    with pytest.raises(InvalidInput, match="schema is not valid JSON"):
        schema_id("[a-z]+")
