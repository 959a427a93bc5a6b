"""Every config.pbtxt (and the README.md next to it) is generated from ragstack/contracts/tensors.py and parses as Triton's
ModelConfig."""
import pytest

from ragstack.contracts import tensors as contracts
from ragstack.contracts.model_config import BLS, PROFILES, all_targets, parse, render, targets
from ragstack_dev.server import ROOT


def test_committed_configs_and_readmes_match_the_contracts():
    stale = [str(p.relative_to(ROOT)) for p, text in all_targets(ROOT).items()
             if not p.exists() or p.read_text() != text]
    assert not stale, f"regenerate with tools/gen_model_configs.py: {stale}"


def test_every_model_folder_on_disk_has_a_generated_readme():
    generated = all_targets(ROOT)
    configs = [*ROOT.glob("bls_models/*/config.pbtxt"), *ROOT.glob("model_repository/*/*/config.pbtxt")]
    assert configs
    for config in configs:
        assert config.with_name("README.md") in generated, config


def test_every_contract_names_its_purpose_and_real_callers():
    """The README of each model opens with these; a caller is a model that exists, or an outside party."""
    for contract in contracts.ALL.values():
        assert contract.doc and "\n" not in contract.doc, contract.name
        assert contract.callers, contract.name
        for who, how in contract.callers:
            assert who in contracts.ALL or who in ("clients", "operators"), (contract.name, who)
            assert how, (contract.name, who)


@pytest.mark.parametrize("path", sorted(targets(ROOT)), ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_as_model_config(path):
    cfg = parse(path.read_text())
    contract = contracts.ALL[cfg.name]
    assert [i.name for i in cfg.input] == [t.name for t in contract.inputs]
    assert [o.name for o in cfg.output] == [t.name for t in contract.outputs]
    assert cfg.max_batch_size == contract.max_batch_size
    if cfg.platform == "ensemble":                  # decoupled-ness comes from the step it runs
        step = cfg.ensemble_scheduling.step[0]
        assert contracts.ENSEMBLES[cfg.name][1].name == step.model_name
        assert dict(step.input_map) == {t.name: t.name for t in contract.inputs}
    else:
        assert cfg.model_transaction_policy.decoupled == contract.decoupled


def test_dynamic_batching_presets_of_spec_002():
    gpu = {d.contract.name: parse(render(d)) for d in PROFILES["trtllm"]}
    assert list(gpu["embed"].dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert 2000 <= gpu["embed"].dynamic_batching.max_queue_delay_microseconds <= 5000
    assert list(gpu["rerank"].dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert gpu["rerank"].dynamic_batching.max_queue_delay_microseconds == 5000


def test_cpu_profile_batches_without_a_queue_window():
    """Same preferred sizes, no waiting: on the CPU a window only adds latency (see model_config.py)."""
    ref = {d.contract.name: parse(render(d)) for d in PROFILES["reference"]}
    orchestrator = parse(render(next(d for d in BLS if d.contract.name == "rag_orchestrator")))
    assert list(ref["embed"].dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert list(ref["rerank"].dynamic_batching.preferred_batch_size) == [2, 4, 8]
    for cfg in (ref["embed"], ref["rerank"], ref["generate"], orchestrator):
        assert cfg.HasField("dynamic_batching"), cfg.name
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 0, cfg.name


def test_batching_needs_a_batch_dimension():
    import dataclasses

    from ragstack.contracts.model_config import Batching

    unbatched = dataclasses.replace(BLS[1], batching=Batching((2,), 100))
    with pytest.raises(ValueError, match="max_batch_size"):
        render(unbatched)
