"""Prompt runtime manifests: the evaluation tool's declaration of the engine and thresholds its prompts were
signed off on.

The evaluation tool (an eval blueprint generator outside this repository, docs/design-notes.md#evaluation) builds
prompts and eval slices against one engine and one set of
readiness thresholds. Before an engine version is promoted, each of its prompt runtime manifests must name the
engine hash and tokenizer-info hash actually served, and the thresholds the runtime policy actually enforces
(``config/runtime_policy.json``); otherwise its eval results describe a different system.
:class:`PromptRuntimeManager` checks a
folder of manifests against the served engine's build manifest and the policy, and :meth:`summary` reports
every disagreement by field (expected vs found) so a reviewer can sign off or say exactly what to fix.

Manifest format (one JSON file per prompt runtime, ``*.json`` in the folder)::

    {
      "name": "eval_blueprint_answers",          # unique within the folder
      "engine_hash": "<sha256 of the served engine>",
      "tokenizer_info_hash": "<hash of the xgrammar tokenizer info>",
      "thresholds": {"max_queue_delay_us": 2500, "max_tokens": 6000, "max_cost_usd": 0.10},
      "tasks": ["answer", "judge"],               # optional: runtime-policy tasks the prompts use
      "description": "..."                        # optional
    }

The engine manifest is read as a plain dict (``engine_hash``, ``tokenizer_info_hash`` among its keys), so this
module does not depend on how that manifest is produced.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Union

from ragstack.governance.policy import RuntimePolicy

ENGINE_FIELDS = ("engine_hash", "tokenizer_info_hash")
THRESHOLD_FIELDS = ("max_queue_delay_us", "max_tokens", "max_cost_usd")
REQUIRED_KEYS = ("name",) + ENGINE_FIELDS + ("thresholds",)
OPTIONAL_KEYS = ("tasks", "description")


class ManifestError(ValueError):
    """A prompt runtime manifest that cannot be read or lacks a required key."""


def read_prompt_manifest(path: Union[str, Path]) -> dict:
    """One prompt runtime manifest, checked for shape (not yet for alignment)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ManifestError("must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ManifestError(f"missing key(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ManifestError(f"unknown key(s) {', '.join(unknown)}")
    if not isinstance(data["name"], str) or not data["name"]:
        raise ManifestError("name must be a non-empty string")
    if not isinstance(data["thresholds"], dict):
        raise ManifestError("thresholds must be an object")
    tasks = data.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ManifestError("tasks must be a list of task names")
    return data


class PromptRuntimeManager:
    """Loads the prompt runtime manifests of a folder and checks them against the served engine and policy."""

    def __init__(self, engine_manifest: Mapping, policy: RuntimePolicy, manifests_dir: Union[str, Path],
                 engine_source: str = "engine manifest"):
        missing = [k for k in ENGINE_FIELDS if not isinstance(engine_manifest.get(k), str)
                   or not engine_manifest.get(k)]
        if missing:
            raise ValueError(f"{engine_source} has no {', '.join(missing)}")
        self.engine = {k: engine_manifest[k] for k in ENGINE_FIELDS}
        self.policy = policy
        self.manifests_dir = Path(manifests_dir)
        self.engine_source = engine_source

    @classmethod
    def from_files(cls, engine_manifest: Union[str, Path], policy: Union[str, Path],
                   manifests_dir: Union[str, Path]) -> "PromptRuntimeManager":
        path = Path(engine_manifest)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"engine manifest {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"engine manifest {path}: must be a JSON object")
        return cls(data, RuntimePolicy.load(policy), manifests_dir, engine_source=f"engine manifest {path}")

    def expected(self) -> dict:
        """What every manifest must reference: the served engine's hashes and the policy's thresholds."""
        t = self.policy.thresholds.as_dict()
        return {**self.engine, "thresholds": {k: t[k] for k in THRESHOLD_FIELDS}}

    def check(self, manifest: Mapping) -> list:
        """Field-by-field disagreements of one (shape-checked) manifest: [{field, expected, found}]."""
        want = self.expected()
        out = []
        for field in ENGINE_FIELDS:
            found = manifest.get(field)
            if not isinstance(found, str) or found.strip().casefold() != want[field].casefold():
                out.append({"field": field, "expected": want[field], "found": found})
        found_t = manifest.get("thresholds", {})
        for key in THRESHOLD_FIELDS:
            expected, found = want["thresholds"][key], found_t.get(key)
            if not _same_number(expected, found):
                out.append({"field": f"thresholds.{key}", "expected": expected, "found": found})
        unknown = [t for t in manifest.get("tasks", []) if t not in self.policy.tasks]
        if unknown:
            out.append({"field": "tasks", "expected": f"tasks of the runtime policy "
                                                      f"({', '.join(self.policy.task_names)})", "found": unknown})
        return out

    def summary(self) -> dict:
        """The alignment report: ``aligned`` is true only when every manifest matches and there is one."""
        problems, entries, names = [], [], {}
        files = sorted(self.manifests_dir.glob("*.json")) if self.manifests_dir.is_dir() else []
        if not self.manifests_dir.is_dir():
            problems.append(f"manifest folder {self.manifests_dir} does not exist")
        elif not files:
            problems.append(f"no prompt runtime manifests (*.json) in {self.manifests_dir}")
        for path in files:
            entry = {"name": path.stem, "path": str(path), "aligned": False, "mismatches": [], "errors": []}
            try:
                data = read_prompt_manifest(path)
            except ManifestError as e:
                entry["errors"].append(str(e))
            else:
                entry["name"] = data["name"]
                entry["mismatches"] = self.check(data)
                entry["aligned"] = not entry["mismatches"]
                if data["name"] in names:
                    problems.append(f"manifest name {data['name']!r} is used by both {names[data['name']]} "
                                    f"and {path}")
                names.setdefault(data["name"], str(path))
            entries.append(entry)
        return {
            "aligned": not problems and all(e["aligned"] for e in entries),
            "expected": self.expected(),
            "sources": {"engine_manifest": self.engine_source, "policy": self.policy.source,
                        "manifests_dir": str(self.manifests_dir)},
            "manifests": entries,
            "problems": problems,
        }


def format_summary(summary: Mapping) -> str:
    """The summary as a few human-readable lines (the CLI prints this)."""
    exp = summary["expected"]
    lines = [f"expected: engine_hash={exp['engine_hash']} tokenizer_info_hash={exp['tokenizer_info_hash']} "
             + " ".join(f"{k}={v}" for k, v in exp["thresholds"].items())]
    for entry in summary["manifests"]:
        lines.append(f"{'OK      ' if entry['aligned'] else 'MISMATCH'} {entry['name']} ({entry['path']})")
        lines += [f"    error: {err}" for err in entry["errors"]]
        lines += [f"    {m['field']}: expected {m['expected']!r}, found {m['found']!r}" for m in entry["mismatches"]]
    lines += [f"problem: {p}" for p in summary["problems"]]
    lines.append("aligned" if summary["aligned"] else "NOT aligned")
    return "\n".join(lines)


def _same_number(expected, found: Optional[object]) -> bool:
    if isinstance(found, bool) or not isinstance(found, (int, float)):
        return False
    return math.isclose(float(expected), float(found), rel_tol=1e-9, abs_tol=0.0)
