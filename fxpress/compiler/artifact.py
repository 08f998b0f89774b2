"""The artifact folder ``fxpress.aot_compile`` writes and ``fxpress.load`` reads, and its checks.

    graph.txt            the final ATen graph (every pass applied), as Python
    wrapper.py           the generated module that runs it: Triton kernels and ``call(args)``
    kernels/<name>.py    each generated Triton kernel, for reading (wrapper.py holds the ones it runs)
    plan.json            the memory plan
    weights.safetensors  the graph's constants in their packed forms, and the initial state it writes
    meta.json            format, versions, options, pass sources' hash, input and output specs,
                         KV state layout, and the size and sha256 of every other file

Nothing is unpickled. meta.json carries a checksum of its own contents, so an edit to it is
refused like a changed file; these hashes catch corruption and accidental edits, they are not
signatures (anyone who can write the folder can write consistent hashes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fxpress.compiler.errors import FxpressError

FORMAT = 1
META = "meta.json"


class ArtifactError(FxpressError, ValueError):
    """An artifact folder that cannot be loaded: missing, changed, truncated or for other versions."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checksum(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return sha256(json.dumps(body, sort_keys=True).encode())


def versions() -> dict[str, str]:
    import triton

    import fxpress

    return {"fxpress": fxpress.__version__, "torch": torch.__version__, "triton": triton.__version__}


def write_files(folder: Path, files: dict[str, bytes], meta: dict[str, Any]) -> None:
    """Every file, then meta.json (with their sizes and hashes) last: a folder whose write was cut
    short has no meta.json, and is refused as such."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / META
    if stale.exists():
        stale.unlink()
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    meta = dict(meta, format=FORMAT, versions=versions(),
                files={name: {"bytes": len(data), "sha256": sha256(data)} for name, data in sorted(files.items())})
    meta["checksum"] = _checksum(meta)
    (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def read_meta(folder: Path, check_versions: bool = True) -> dict[str, Any]:
    path = folder / META
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    if not path.is_file():
        raise ArtifactError(f"{folder}: missing {META} (not an fxpress artifact, or its write was cut short)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is corrupted: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("checksum") != _checksum(meta):
        raise ArtifactError(f"{path} was edited or corrupted: its checksum does not match its contents")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{folder} is artifact format {meta.get('format')}; this fxpress reads format {FORMAT}")
    if check_versions:
        _check_versions(folder, meta["versions"])
    return meta


def _release(version: str) -> tuple[str, ...]:
    """``2.11.0+cu130`` -> ``("2", "11")``: generated code is tied to a minor release, not a build."""
    return tuple(version.split("+")[0].split(".")[:2])


def _check_versions(folder: Path, recorded: dict[str, str]) -> None:
    here = versions()
    for name in ("fxpress", "torch", "triton"):
        same = recorded.get(name) == here[name] if name == "fxpress" else \
            _release(recorded.get(name, "")) == _release(here[name])
        if not same:
            raise ArtifactError(f"{folder} was compiled with {name} {recorded.get(name)}; this is {name} "
                                f"{here[name]}. Compile it again with this version (fxpress compile ...).")


def read_file(folder: Path, meta: dict[str, Any], name: str) -> bytes:
    """A file's bytes, checked against its size and sha256 in meta.json."""
    record = meta["files"].get(name)
    if record is None:
        raise ArtifactError(f"{folder}: meta.json lists no file {name}")
    path = folder / name
    if not path.is_file():
        raise ArtifactError(f"{folder}: missing {name}")
    data = path.read_bytes()
    if len(data) != record["bytes"]:
        raise ArtifactError(f"{path} is {len(data)} bytes; meta.json records {record['bytes']} "
                            f"({'truncated' if len(data) < record['bytes'] else 'appended to'}?)")
    if sha256(data) != record["sha256"]:
        raise ArtifactError(f"{path} has changed since it was written: its sha256 does not match meta.json")
    return data


def verify(folder: Path, meta: dict[str, Any]) -> dict[str, bytes]:
    """Every file listed in meta.json, checked."""
    return {name: read_file(folder, meta, name) for name in meta["files"]}
