"""ragstack.settings: one typed, validated object for the environment and model_manager's parameters."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ragstack import settings as rs
from ragstack.lifecycle.budget import MemoryBudget
from ragstack.lifecycle.manager import ModelManager, ModelSpec

ROOT = Path(__file__).resolve().parents[2]


def test_an_empty_environment_gives_the_defaults():
    s = rs.from_env({})
    assert s == rs.Settings()
    assert s.policy_file == ROOT / "config" / "runtime_policy.json"
    assert s.http_port is None and s.loader_http_port == rs.DEFAULT_HTTP_PORT == 8000
    assert s.grpc_port is None and s.loader_grpc_port == rs.DEFAULT_GRPC_PORT
    assert s.lease_timeout_s == 120.0 and s.data_base == Path(".")
    assert s.engine_repositories()[0] == Path("/models/engines")


def test_values_are_parsed_into_their_types():
    s = rs.from_env({"TRITON_GRPC_PORT": "18001", "RAG_LEASE_TIMEOUT_S": "2.5", "ENGINE_PATH": "/e",
                     "RAG_API_KEYS": " r1, r2 ,,", "RAG_DIRECT_MODELS": "embed,*", "RAG_VECTOR_STORE": "PGVector",
                     "RAG_PG_EF_SEARCH": "64", "MODEL_REPO": "/m", "PROFILE": "trtllm", "RAG_MEMORY_BUDGET": "12G"})
    assert s.grpc_port == 18001 and s.lease_timeout_s == 2.5 and s.engine_path == Path("/e")
    assert s.keys("reader") == (("r1", "r2"), None) and s.direct_models == frozenset({"embed", "*"})
    assert s.vector_store == "pgvector" and s.pg_ef_search == 64 and s.memory_budget == "12G"
    assert s.engine_repositories()[:3] == [Path("/m"), Path("/models/engines"), ROOT / "model_repository" / "trtllm"]


def test_empty_means_unset_except_for_the_event_destinations():
    s = rs.from_env({"ENGINE_PATH": "", "TRITON_GRPC_PORT": " ", "RAGSTACK_EVENT_LOG": ""})
    assert s.engine_path is None and s.grpc_port is None
    assert s.event_log == ""          # set but empty: the event log is off, whatever the policy says


@pytest.mark.parametrize("name, value, expected", [
    ("RAG_LEASE_TIMEOUT_S", "soon", "seconds"),
    ("RAG_LEASE_TIMEOUT_S", "-1", "above 0"),
    ("TRITON_GRPC_PORT", "70000", "1..65535"),
    ("TRITON_HTTP_PORT", "http", "port"),
    ("RAG_VECTOR_STORE", "faiss", "flat, pgvector"),
    ("PROFILE", "gpu", "reference, trtllm"),
    ("RAG_MEMORY_BUDGET", "lots", "size"),
    ("RAG_PG_EF_SEARCH", "0", "1 or more"),
])
def test_a_bad_value_names_the_variable(name, value, expected):
    with pytest.raises(rs.SettingsError, match=rf"^environment variable {name}=.*{re.escape(expected)}"):
        rs.from_env({name: value})


def test_secrets_are_never_shown():
    env = {"RAG_ADMIN_KEY": "adm1n-s3cret", "TRITON_ADMIN_KEY": "tr1ton-s3cret", "RAG_PG_DSN": "postgresql://u:pw@h/d",
           "RAGSTACK_EVENT_WEBHOOK_URL": "https://hook/t0ken"}
    text = "\n".join(rs.describe(rs.from_env(env)))
    for secret in ("adm1n-s3cret", "tr1ton-s3cret", "pw@h", "t0ken"):
        assert secret not in text
    assert re.search(r"\* RAG_ADMIN_KEY +\(set\)", text)
    with pytest.raises(rs.SettingsError) as info:             # nor in an error about the value
        rs.from_env({"RAG_ADMIN_KEY": "x", "TRITON_HTTP_PORT": "x"})
    assert "TRITON_HTTP_PORT='x'" in str(info.value)


def test_current_follows_the_environment(monkeypatch):
    monkeypatch.setenv("RAG_LEASE_TIMEOUT_S", "7")
    first = rs.current()
    assert first.lease_timeout_s == 7.0 and rs.current() is first        # built once while nothing changes
    monkeypatch.setenv("RAG_LEASE_TIMEOUT_S", "8")
    assert rs.current().lease_timeout_s == 8.0
    monkeypatch.delenv("RAG_LEASE_TIMEOUT_S")
    assert rs.current().lease_timeout_s == rs.Settings().lease_timeout_s


def test_the_fast_snapshot_sees_every_variable(monkeypatch):
    """current() reads os.environ's encoded dict directly: it must see what os.environ.get sees, for every
    variable, set, changed and removed."""
    def slow():
        return tuple(os.environ.get(name) for name in rs.ENV_NAMES)

    def fast():
        return tuple(v if v is None or isinstance(v, str) else os.fsdecode(v) for v in rs._snapshot())
    assert fast() == slow()
    for i, name in enumerate(rs.ENV_NAMES):
        monkeypatch.setenv(name, f"v{i}-\u00e9")
        assert fast() == slow()
    for name in rs.ENV_NAMES[::2]:
        monkeypatch.delenv(name)
    assert fast() == slow()


def test_every_variable_is_documented_once():
    assert len(set(rs.ENV_NAMES)) == len(rs.ENV_NAMES)
    for f in dataclasses.fields(rs.Settings):
        assert f.metadata["doc"], f.name
        if f.metadata.get("env"):
            assert f.metadata["kind"], f.name


def test_readme_table_is_the_settings_object():
    readme = (ROOT / "README.md").read_text()
    assert rs.readme_block(readme) == rs.markdown_table(), "run: python -m ragstack.settings --readme"
    for name in rs.ENV_NAMES:
        assert f"| `{name}` |" in readme


# Reads of the environment outside ragstack/settings.py. Each has a reason to stay: a write, a client-side key
# (what a client sends, not what the server accepts), the launcher's child environment, the self-contained loader.
ALLOWED_ENV_READS = {
    "ragstack/settings.py", "ragstack/pipeline/documents.py", "ragstack_dev/server.py", "ragstack/lifecycle/client.py",
    "bls_models/model_manager/loader.py", "tools/rag_client.py",
}


def test_the_runtime_reads_the_environment_only_through_settings():
    found = set()
    for top in ("ragstack", "ragstack_dev", "bls_models", "model_repository", "tools"):
        for path in (ROOT / top).rglob("*.py"):
            if re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text()):
                found.add(str(path.relative_to(ROOT)))
    assert found <= ALLOWED_ENV_READS, f"read these through ragstack.settings: {sorted(found - ALLOWED_ENV_READS)}"


def test_the_launcher_prints_the_settings_and_stops_on_a_bad_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in rs.ENV_NAMES}
    env.update(PROFILE="trtllm", RAG_DATA_PATH=str(tmp_path / "data"), ENGINE_PATH=str(tmp_path),
               TRITON_BIN="/bin/true", RAG_RUN_DIR=str(tmp_path / "run"), RAG_LEASE_TIMEOUT_S="soon")
    bad = subprocess.run(["bash", str(ROOT / "tools" / "serve_triton.sh")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert "environment variable RAG_LEASE_TIMEOUT_S='soon' is not valid" in bad.stderr
    env["RAG_LEASE_TIMEOUT_S"] = "30"
    env["RAG_API_KEYS"] = "r3ader-key"
    good = subprocess.run(["bash", str(ROOT / "tools" / "serve_triton.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert good.returncode == 0, good.stderr          # /bin/true stands in for tritonserver
    assert re.search(r"\* RAG_LEASE_TIMEOUT_S +30\.0", good.stderr)
    assert re.search(r"\* RAG_API_KEYS +\(set\)", good.stderr) and "r3ader-key" not in good.stderr
    assert re.search(r"\* TRITON_ADMIN_KEY +\(set\)", good.stderr)     # printed after the launcher made one
    assert re.search(r"\* RAG_INTERNAL_SECRET_FILE +\S*/internal_secret", good.stderr)
    assert good.stderr.count("ragstack settings") == 1


def test_python_m_settings_exits_2_on_a_bad_value():
    env = {k: v for k, v in os.environ.items() if k not in rs.ENV_NAMES}
    env["TRITON_GRPC_PORT"] = "0"
    out = subprocess.run([sys.executable, "-m", "ragstack.settings"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "TRITON_GRPC_PORT" in out.stderr


# ------------------------------------------------------------------------------------------ model_manager
def test_manager_params_defaults_are_the_generated_config():
    from ragstack.contracts.model_config import BLS

    deployment = next(d for d in BLS if d.contract.name == "model_manager")
    assert tuple(deployment.parameters) == rs.ManagerParams.config_parameters()
    p = rs.ManagerParams.from_parameters(dict(deployment.parameters))
    assert p == rs.ManagerParams()
    assert p.parallel_loads == 2 and p.managed_models == ("embed", "rerank", "generate")


def test_manager_params_parse_and_name_a_bad_parameter():
    p = rs.ManagerParams.from_parameters({"phases": "embed generate", "cooldown_s": "3", "seed_base_bytes": "1G",
                                          "server_url": "", "parallel_loads": "4"})
    assert p.phases == ("embed", "generate") and p.cooldown_s == 3.0 and p.seed_base_bytes == 1 << 30
    assert p.server_url is None and p.parallel_loads == 4
    for key, value in (("load_api", "ftp"), ("parallel_loads", "0"), ("safety_buffer", "1.5"), ("tick_s", "x")):
        with pytest.raises(rs.SettingsError, match=f"^model_manager parameter {key}="):
            rs.ManagerParams.from_parameters({key: value})


class _Loader:
    def __init__(self, concurrent):
        self.concurrent_loads = concurrent


def test_model_manager_defaults_are_the_manager_params():
    mgr = ModelManager([ModelSpec("embed", 1)], budget=MemoryBudget(1 << 30, 0.2), loader=_Loader(True))
    d = rs.MANAGER_DEFAULTS
    assert (mgr.parallel_loads, mgr.cooldown_s, mgr.lease_ttl_s, mgr.slow_load_s, mgr.tick_s) == \
        (d.parallel_loads, d.cooldown_s, d.lease_ttl_s, d.slow_load_s, d.tick_s)
    one_at_a_time = ModelManager([ModelSpec("embed", 1)], budget=MemoryBudget(1 << 30, 0.2), loader=_Loader(False))
    assert one_at_a_time.parallel_loads == 1
