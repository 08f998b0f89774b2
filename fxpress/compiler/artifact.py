"""The artifact folder ``fxpress.aot_compile`` writes and ``fxpress.load`` reads, and its checks.

    graph.json           the final ATen graph (every pass applied) as data: what load generates from
    graph.txt            the same graph as Python, for reading
    wrapper.py           the generated module that runs it (Triton kernels and ``call(args)``), for
                         reading: load generates it again from graph.json and runs that
    kernels/<name>.py    each generated Triton kernel, for reading (wrapper.py holds the ones it runs)
    plan.json            the memory plan
    weights.safetensors  the graph's constants in their packed forms, and the initial state it writes
    meta.json            format, versions, options, pass sources' hash, input and output specs,
                         KV state layout, and the size and sha256 of every other file

Nothing is unpickled and no code from the folder runs. meta.json carries a checksum of its own
contents, so an edit to it is refused like a changed file; these hashes catch corruption and
accidental edits, they are not signatures (anyone who can write the folder can write consistent
hashes), which is why loading treats every file as data: meta.json's fields are checked for type
before use, file names must stay inside the folder (no absolute paths, no ``..``, no symlinks), and
a file's size is checked before it is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fxpress.core.errors import FxpressError
from fxpress.core.version import VERSION

FORMAT = 4  # 2: graph.json, from which load regenerates the wrapper; 3: kernels[].generated (any target);
# 4: dim_names (the names the user gave dynamic dimensions)
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

    return {"fxpress": VERSION, "torch": torch.__version__, "triton": triton.__version__}


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
    check_fields(path, meta, META_FIELDS)
    if check_versions:
        _check_versions(folder, meta["versions"])
    return meta


# The fields of meta.json that loading reads, with their types: a crafted meta.json is refused
# naming the field, never a KeyError deep inside. ``[T]`` is a list of T, ``{"*": T}`` a mapping of
# names to T, a dict a record with those fields.
_INT, _STR = int, str
_SIZES = [(int, str)]
META_FIELDS: dict[str, Any] = {
    "format": _INT,
    "versions": {"fxpress": _STR, "torch": _STR, "triton": _STR},
    "target": _STR,
    "device": _STR,
    "files": {"*": {"bytes": _INT, "sha256": _STR}},
    "inputs": [{"name": _STR, "dtype": _STR, "shape": [(int, str)]}],
    "kwargs": [_STR],
    "in_spec": _STR,
    "out_spec": _STR,
    "runtime_inputs": [[(int, str)]],
    "constants": {"*": {"key": _STR, "size": [int], "stride": [int]}},
    "kv_states": [{"handle": _INT, "policy": {"class": _STR, "fields": dict}, "layer": _INT, "max_len": _INT,
                   "where": _STR}],
    "symbols": {"*": _INT},
    "dim_names": {"*": _STR},
}


def check_fields(where: Any, value: Any, schema: Any, field: str = "meta.json") -> None:
    """Refuse ``value`` unless it has ``schema``'s shape (see META_FIELDS), naming the first field
    that does not."""
    def refuse(expected: str) -> ArtifactError:
        return ArtifactError(f"{where}: field {field} must be {expected}, got {type(value).__name__} {value!r:.80}")

    if isinstance(schema, list):
        if not isinstance(value, list):
            raise refuse("a list")
        for i, item in enumerate(value):
            check_fields(where, item, schema[0], f"{field}[{i}]")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise refuse("an object")
        if "*" in schema:
            for key, item in value.items():
                check_fields(where, item, schema["*"], f"{field}[{key!r}]")
            return
        for key, item_schema in schema.items():
            if key not in value:
                raise ArtifactError(f"{where}: field {field}.{key} is missing")
            check_fields(where, value[key], item_schema, f"{field}.{key}")
    else:
        kinds = schema if isinstance(schema, tuple) else (schema,)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise refuse(" or ".join(k.__name__ for k in kinds))
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise refuse("a count >= 0")


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


def check_name(folder: Path, name: str) -> list[str]:
    """The parts of a file name meta.json gives, refused unless it is a plain relative path."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or ":" in name or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"{folder}: meta.json names the file {name!r}, which is not a plain relative path "
                            "inside the artifact")
    return parts


def _inside(folder: Path, name: str) -> Path:
    """``folder/name`` for a plain relative name that stays in the folder, through no symlink."""
    parts = check_name(folder, name)
    path = folder
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise ArtifactError(f"{folder}: {name} is (or lies under) a symbolic link; artifacts hold plain files")
    return path


# Files read through a memory map by their loader (safetensors) rather than into bytes: verify
# hashes them in chunks and hands back their path, so the weights are never in memory twice.
MAPPED = ("weights.safetensors",)
_CHUNK = 1 << 20


def _checked_path(folder: Path, meta: dict[str, Any], name: str) -> tuple[Path, dict[str, Any]]:
    """The path of a file meta.json lists, refused when missing or of another size."""
    record = meta["files"].get(name)
    if record is None:
        raise ArtifactError(f"{folder}: meta.json lists no file {name}")
    path = _inside(folder, name)
    if not path.is_file():
        raise ArtifactError(f"{folder}: missing {name}")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ArtifactError(f"{path} is {size} bytes; meta.json records {record['bytes']} "
                            f"({'truncated' if size < record['bytes'] else 'appended to'}?)")
    return path, record


def _refuse_changed(path: Path, record: dict[str, Any], size: int, digest: str) -> None:
    if size != record["bytes"]:
        raise ArtifactError(f"{path} is {size} bytes; meta.json records {record['bytes']} "
                            f"({'truncated' if size < record['bytes'] else 'appended to'}?)")
    if digest != record["sha256"]:
        raise ArtifactError(f"{path} has changed since it was written: its sha256 does not match meta.json")


def read_file(folder: Path, meta: dict[str, Any], name: str) -> bytes:
    """A file's bytes, checked against its size (before reading) and sha256 in meta.json."""
    path, record = _checked_path(folder, meta, name)
    with path.open("rb") as f:
        data = f.read(record["bytes"] + 1)  # never more than recorded, should it grow meanwhile
    _refuse_changed(path, record, len(data), sha256(data))
    return data


def checked_file(folder: Path, meta: dict[str, Any], name: str) -> Path:
    """A file's path once its size and sha256 match meta.json, hashed in chunks (never held
    whole). Its loader maps it afterwards: the hash catches corruption and edits made before the
    load, as every check here does, not a writer racing the load (the folder is its owner's)."""
    path, record = _checked_path(folder, meta, name)
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while size <= record["bytes"] and (chunk := f.read(_CHUNK)):
            digest.update(chunk)
            size += len(chunk)
    _refuse_changed(path, record, size, digest.hexdigest())
    return path


def verify(folder: Path, meta: dict[str, Any]) -> dict[str, bytes | Path]:
    """Every file listed in meta.json, checked: its bytes, or for ``MAPPED`` files its path."""
    return {name: checked_file(folder, meta, name) if name in MAPPED else read_file(folder, meta, name)
            for name in meta["files"]}
