"""The ``trtllm`` model repository's version folders, and where the deployment mounts the built engines.

Triton reads a TensorRT plan from ``<model>/1/model.plan``; the plans, though, are built into the engine folder
(``build/engines/<set>/<kind>/model.plan``), which the container mounts read-only at ``/workspace/engines`` while the
repository itself comes from the image. So the repository's version folders hold symbolic links to where the
plans appear inside the container; the ``tensorrtllm`` model reads its engine from ``gpt_model_path`` and only
needs its version folder to exist. ``engine_builds/build.py repository`` (re)creates both; the config.pbtxt files
next to them come from ``tools/gen_model_configs.py``.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from ragstack.model_config import TRTLLM

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
    """``{link in the repository: target inside the container}`` for every tensorrt_plan model."""
    return {Path(root) / "model_repository" / PROFILE / dep.contract.name / VERSION / PLAN_FILE:
            CONTAINER_ENGINES / dep.contract.name / PLAN_FILE
            for dep in TRTLLM if dep.platform == "tensorrt_plan"}


def version_readmes(root: Path) -> list:
    return [Path(root) / "model_repository" / PROFILE / dep.contract.name / VERSION / "README.md"
            for dep in TRTLLM if dep.backend == "tensorrtllm" and not dep.platform]


def link(root: Path) -> list:
    """Create (or correct) the version folders; returns the paths written."""
    written = []
    for path, target in plan_links(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() and Path(path.readlink()) == Path(target):
            continue
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)
        written.append(path)
    for path in version_readmes(root):
        if not path.is_file() or path.read_text() != VERSION_README:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(VERSION_README)
            written.append(path)
    return written


def check(root: Path) -> list:
    """What is missing or wrong in the version folders, as readable lines."""
    problems = []
    for path, target in plan_links(root).items():
        if not path.is_symlink():
            problems.append(f"{path} is not a link to {target}")
        elif Path(path.readlink()) != Path(target):
            problems.append(f"{path} links to {path.readlink()}, expected {target}")
    problems += [f"{path} is missing" for path in version_readmes(root) if not path.is_file()]
    return problems
