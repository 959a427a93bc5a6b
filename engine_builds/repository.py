"""The ``trtllm`` model repository's version folders, and where the deployment mounts the built engines.

The plans are built into the engine folder (``build/engines/<set>/<kind>/model.plan``), which the container mounts
read-only at ``/workspace/engines`` while the repository itself comes from the image. The trtllm image has no
``tensorrt_plan`` platform, so ``embed`` and ``rerank`` are Python-backend models whose committed ``model.py`` reads
``<ENGINE_PATH>/<engine_dir>/<plan_file>`` (ragstack/engines/trt_plan.py); the ``tensorrtllm`` model reads its engine from
``gpt_model_path`` and only needs its version folder to exist. ``engine_builds/build.py repository`` (re)creates the
version folders (and removes the ``model.plan`` links an older layout left there); the config.pbtxt files next to
them come from ``tools/gen_model_configs.py``.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from ragstack.contracts.model_config import TRTLLM

from engine_builds.trtexec import PLAN_FILE

PROFILE = "trtllm"
VERSION = "1"
# Inside the container (tools/serve_triton.sh, docker-compose.triton.yml): the engine set and the generator's
# tokenizer folder (the generate engine folder, which holds tokenizer_info.json too).
CONTAINER_ENGINES = PurePosixPath("/workspace/engines")
CONTAINER_TOKENIZER = PurePosixPath("/workspace/tokenizer")
VERSION_README = ("The tensorrtllm backend loads its engine from gpt_model_path (see ../config.pbtxt); Triton only "
                  "needs this version folder to exist.\n")


def plan_links(root: Path) -> dict:
    """``{the Python model that serves a plan: the plan's path inside the container}`` for every plan model."""
    out = {}
    for dep in TRTLLM:
        params = dict(dep.parameters)
        if "plan_file" in params:
            out[Path(root) / "model_repository" / PROFILE / dep.contract.name / VERSION / "model.py"] = \
                CONTAINER_ENGINES / params["engine_dir"] / params["plan_file"]
    return out


def _stale_links(root: Path) -> list:
    return [p.parent / PLAN_FILE for p in plan_links(root) if (p.parent / PLAN_FILE).is_symlink()]


def version_readmes(root: Path) -> list:
    return [Path(root) / "model_repository" / PROFILE / dep.contract.name / VERSION / "README.md"
            for dep in TRTLLM if dep.backend == "tensorrtllm" and not dep.platform]


def link(root: Path) -> list:
    """Create (or correct) the version folders; returns the paths written or removed."""
    written = []
    for path in _stale_links(root):
        path.unlink()
        written.append(path)
    for path in version_readmes(root):
        if not path.is_file() or path.read_text() != VERSION_README:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(VERSION_README)
            written.append(path)
    return written


def check(root: Path) -> list:
    """What is missing or wrong in the version folders, as readable lines."""
    problems = [f"{path} is missing: it serves the plan {target}" for path, target in plan_links(root).items()
                if not path.is_file()]
    problems += [f"{path} is a link left from the tensorrt_plan layout: remove it" for path in _stale_links(root)]
    problems += [f"{path} is missing" for path in version_readmes(root) if not path.is_file()]
    return problems
