"""Engine manifests: what an engine folder holds, what it was built from and with, and one hash to quote.

Every build step in ``engine_builds/`` (ONNX export, TensorRT plan, TensorRT-LLM engine, tokenizer info) rewrites
the ``manifest.json`` of the folder it wrote into, so the manifest always describes the files as they are now.
The serving side only reads it: a BLS model can stamp responses with the engine hash and quantisation (the
``X-Engine-Hash`` / ``X-Quantisation`` headers clients must send), and an operator can check a deployed folder
against its manifest.

Pure logic (hashlib, json): no torch, no TensorRT, importable inside the Triton Python backend.

Hashes are sha256. The combined hashes (engine, tokenizer) are taken over sorted ``name, file hash`` pairs, so
they change when any byte of any file changes, when a file is added or removed, and when one is renamed, and do
not depend on the order a directory lists its files.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Optional

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
TOKENIZER_INFO_FILE = "tokenizer_info.json"

# Files that define what an engine computes: compiled plans and engines, exported graphs, weights, the model or
# engine build config, and engine.json (Matryoshka dim, prompt templates). Searched recursively, so a TensorRT-LLM
# engine kept in a sub-folder of the engine folder counts too.
ENGINE_PATTERNS = ("*.plan", "*.engine", "*.onnx", "*.onnx.data", "*.safetensors", "*.safetensors.index.json",
                   "config.json", "engine.json")
# Files that define how text becomes token ids (and back). Searched at the top of the folder only.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks (plans and weights run to gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def combined_hash(file_hashes: dict) -> str:
    """One sha256 over ``{relative name: sha256}``, independent of listing order."""
    h = hashlib.sha256()
    for name in sorted(file_hashes):
        h.update(name.encode("utf-8") + b"\0" + file_hashes[name].encode("ascii") + b"\n")
    return h.hexdigest()


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def engine_files(folder: Path) -> dict:
    """``{relative posix path: sha256}`` of the engine files in ``folder`` (hidden work folders skipped)."""
    folder = Path(folder)
    found = {}
    for pattern in ENGINE_PATTERNS:
        for path in folder.rglob(pattern):
            rel = path.relative_to(folder)
            if path.is_file() and not _hidden(rel):
                found[rel.as_posix()] = sha256_file(path)
    return dict(sorted(found.items()))


def tokenizer_files(folder: Path) -> dict:
    """``{name: sha256}`` of the tokenizer files present at the top of ``folder``."""
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in sorted(TOKENIZER_FILES) if (folder / name).is_file()}


def tokenizer_hash(folder: Path) -> Optional[str]:
    """Combined hash of the tokenizer files in ``folder``, or None when it has none."""
    files = tokenizer_files(folder)
    return combined_hash(files) if files else None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass
class Manifest:
    """The contents of ``manifest.json``.

    ``steps`` maps a build step (``onnx``, ``plan``, ``trtllm``, ``tokenizer_info``, ``reference``) to what that
    step recorded: its arguments, the versions of the tools it used, and when it ran. Steps accumulate across
    rewrites; the file hashes are always those of the folder as last written.
    """

    kind: str
    name: str
    quantisation: str
    engine_hash: str
    files: dict
    tokenizer_hash: Optional[str]
    tokenizer_files: dict
    tokenizer_info_hash: Optional[str]
    steps: dict
    created_utc: str
    schema: int = SCHEMA_VERSION
    # Per-1k-token prices (price_per_1k_input_usd, price_per_1k_output_usd) that the cost policy reads;
    # set by the operator for a generator, absent otherwise.
    pricing: Optional[dict] = None

    def headers(self) -> dict:
        """The headers that name this engine: every generation request must carry them, and responses may too."""
        return {"X-Engine-Hash": self.engine_hash, "X-Quantisation": self.quantisation}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


def build_manifest(folder: Path, *, kind: str, name: str, step: str, args: dict, tools: dict,
                   quantisation: Optional[str] = None, previous: Optional[Manifest] = None,
                   now: Optional[str] = None, pricing: Optional[dict] = None) -> Manifest:
    """Hash ``folder`` as it is and record ``step``; earlier steps and quantisation carry over from ``previous``."""
    folder = Path(folder)
    now = now or utc_now()
    files = engine_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no engine files ({', '.join(ENGINE_PATTERNS)}) to put in a manifest")
    tok_files = tokenizer_files(folder)
    info = folder / TOKENIZER_INFO_FILE
    steps = dict(previous.steps) if previous else {}
    steps[step] = {"args": _jsonable(args), "tools": dict(sorted(tools.items())), "utc": now}
    if quantisation is None:
        quantisation = previous.quantisation if previous else "none"
    return Manifest(kind=kind, name=name, quantisation=quantisation, engine_hash=combined_hash(files),
                    files=files, tokenizer_hash=combined_hash(tok_files) if tok_files else None,
                    tokenizer_files=tok_files, tokenizer_info_hash=sha256_file(info) if info.is_file() else None,
                    steps=dict(sorted(steps.items())), created_utc=now,
                    pricing=pricing if pricing is not None else (previous.pricing if previous else None))


def _jsonable(value):
    """Build arguments as JSON values (paths become strings) so a manifest always serialises."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(manifest.to_json())
    return path


def update_manifest(folder: Path, *, kind: str, name: str, step: str, args: dict, tools: dict,
                    quantisation: Optional[str] = None, pricing: Optional[dict] = None) -> Manifest:
    """Re-hash ``folder``, add ``step`` to whatever manifest it already has, and write it back."""
    folder = Path(folder)
    previous = read_manifest(folder) if (folder / MANIFEST_FILE).is_file() else None
    manifest = build_manifest(folder, kind=kind, name=name, step=step, args=args, tools=tools,
                              quantisation=quantisation, previous=previous, pricing=pricing)
    write_manifest(folder, manifest)
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """The manifest of an engine folder (or of the file itself when given ``manifest.json``)."""
    path = Path(folder)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: build the engine with engine_builds/build.py") from None
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: manifest schema {data.get('schema')!r}, this code reads {SCHEMA_VERSION}")
    known = {f.name for f in dataclasses.fields(Manifest)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown manifest fields {unknown}")
    return Manifest(**data)


def verify_manifest(folder: Path) -> list:
    """What differs between ``folder`` and its manifest, as readable lines; empty when they agree."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for label, recorded, current in (("engine file", manifest.files, engine_files(folder)),
                                     ("tokenizer file", manifest.tokenizer_files, tokenizer_files(folder))):
        for name in sorted(set(recorded) | set(current)):
            if name not in current:
                problems.append(f"{label} {name} is missing")
            elif name not in recorded:
                problems.append(f"{label} {name} is not in the manifest")
            elif recorded[name] != current[name]:
                problems.append(f"{label} {name} has changed (sha256 {current[name][:12]}…, "
                                f"manifest {recorded[name][:12]}…)")
    info = folder / TOKENIZER_INFO_FILE
    current_info = sha256_file(info) if info.is_file() else None
    if current_info != manifest.tokenizer_info_hash:
        problems.append(f"{TOKENIZER_INFO_FILE} does not match the manifest")
    return problems
