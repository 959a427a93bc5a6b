"""The external tools a build runs (trtexec, trtllm-build, TensorRT-LLM's example scripts) and their versions.

A build step first produces its command lines; only then does it decide whether to print them (``--dry-run``) or
run them. ``trtexec`` (the ``plan`` step) ships in the TensorRT container of the serving container's TensorRT
(``ragstack.contracts.tensors.TENSORRT_CONTAINER``; the trtllm image has none), ``trtllm-build`` and TensorRT-LLM's scripts
in the pinned trtllm container (``TRTLLM_CONTAINER``). Outside them the step stops with :class:`ToolMissing`,
saying where the tool is found, instead of failing half-way.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ragstack.contracts.tensors import TENSORRT_CONTAINER, TRTLLM_CONTAINER, TRTLLM_TENSORRT_VERSION

PYTHON_TOOLS = ("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "onnxscript", "xgrammar")
# Where NVIDIA's TensorRT containers keep trtexec when it is not on PATH.
TRTEXEC_LOCATIONS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec", "/workspace/tensorrt/bin/trtexec")


class ToolMissing(RuntimeError):
    """A build tool is not installed here; the message says where it is."""


def python_versions(names=PYTHON_TOOLS) -> dict:
    """Installed versions of the Python packages a step used (absent ones are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def find_tool(name: str) -> Optional[str]:
    path = shutil.which(name)
    if path is None and name == "trtexec":
        path = next((p for p in TRTEXEC_LOCATIONS if os.access(p, os.X_OK)), None)
    return path


# Where each tool ships, for the message when it is missing.
TOOL_HOMES = {
    "trtexec": (f"{TENSORRT_CONTAINER} (TensorRT {TRTLLM_TENSORRT_VERSION}, the TensorRT of {TRTLLM_CONTAINER}, "
                "which itself has no trtexec). Run the plan step there: tools/build_plans.sh does"),
    "trtllm-build": f"{TRTLLM_CONTAINER}. Run this step inside that container",
}


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        home = TOOL_HOMES.get(name, f"{TRTLLM_CONTAINER}. Run this step inside that container")
        raise ToolMissing(f"{name} is not installed on this machine: it ships in {home}, or use --dry-run to print "
                          "the commands.")
    return path


def trtexec_version(output: str) -> Optional[str]:
    """TensorRT version from trtexec's banner, e.g. ``[TensorRT v101303]`` -> ``10.13.3``."""
    match = re.search(r"TensorRT v(\d+)", output)
    if not match:
        return None
    digits = match.group(1)
    major, rest = digits[:-4], digits[-4:]
    return f"{int(major)}.{int(rest[:2])}.{int(rest[2:])}"


def trtllm_version() -> Optional[str]:
    for name in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def show(argv) -> str:
    """A command as a shell line (what --dry-run prints and the log shows)."""
    return shlex.join(str(a) for a in argv)


@dataclasses.dataclass
class RunResult:
    returncode: int
    output: str        # the first and last lines of stdout + stderr (banners carry versions, tails carry errors)


def run(argv, *, log=None, keep: int = 200) -> RunResult:
    """Run a command, echoing its output line by line as it comes (engine builds take minutes to hours)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    log(f"$ {show(argv)}")
    head, tail = [], collections.deque(maxlen=keep)
    with subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as process:
        for line in process.stdout:
            line = line.rstrip("\n")
            log(f"  {line}")
            (head if len(head) < keep else tail).append(line)
    return RunResult(process.returncode, "\n".join(head + list(tail)))


def examples_dir(value: Optional[str]) -> Path:
    """TensorRT-LLM's ``examples/`` folder: a checkout of the release the container pins (see docs)."""
    return Path(value or os.environ.get("TRTLLM_EXAMPLES", "TensorRT-LLM/examples"))
