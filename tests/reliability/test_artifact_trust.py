"""Loading an artifact runs no code it carries and reads nothing outside it: an edited wrapper.py
with recomputed hashes never runs, crafted meta.json fields are refused by name, and file names
cannot leave the folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.compiler import artifact
from tests.aot.models import mlp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return fxpress.aot_compile(mlp(), (torch.randn(3, 16),), tmp_path_factory.mktemp("a") / "mlp", target="cpu")


@pytest.fixture
def copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "copy"))


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def _write_meta(folder: Path, meta: dict) -> None:
    """What someone who can write the folder can do: consistent hashes and checksum."""
    meta["checksum"] = artifact._checksum(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def _replace_file(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)
    meta = _meta(folder)
    meta["files"][name] = {"bytes": len(data), "sha256": artifact.sha256(data)}
    _write_meta(folder, meta)


def _planted(marker: Path) -> bytes:
    return (f"open({str(marker)!r}, 'w').write('ran')\n"
            "def call(args):\n    return (args[0],)\n").encode()


def test_an_edited_wrapper_with_recomputed_hashes_never_runs(copy, tmp_path):
    marker = tmp_path / "marker"
    _replace_file(copy, "wrapper.py", _planted(marker))
    with pytest.raises(fxpress.ArtifactError, match="regenerated from graph.json differs"):
        fxpress.load(copy)
    assert not marker.exists()


def test_the_command_line_does_not_run_it_either(copy, tmp_path):
    marker = tmp_path / "marker"
    _replace_file(copy, "wrapper.py", _planted(marker))
    done = subprocess.run([sys.executable, "-m", "fxpress", "run", str(copy)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert done.returncode != 0 and "differs" in done.stderr
    assert not marker.exists()


def test_a_graph_calling_something_else_than_an_op_is_refused(copy):
    graph = json.loads((copy / "graph.json").read_text())
    call = next(n for n in graph["nodes"] if n["op"] == "call_function")
    call["target"] = "builtins.eval"
    _replace_file(copy, "graph.json", json.dumps(graph).encode())
    with pytest.raises(fxpress.ArtifactError, match="op 'builtins.eval' is not an aten"):
        fxpress.load(copy)


def test_an_edited_graph_is_refused_by_the_recorded_wrapper(copy):
    graph = json.loads((copy / "graph.json").read_text())
    gelu = next(n for n in graph["nodes"] if n.get("target") == "aten.gelu.default")
    gelu["target"] = "aten.relu.default"
    _replace_file(copy, "graph.json", json.dumps(graph).encode())
    with pytest.raises(fxpress.ArtifactError, match="differs from the recorded wrapper.py"):
        fxpress.load(copy)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "kernels/../../outside.bin", "a\\\\b"])
def test_file_names_outside_the_folder_are_refused_without_reading_them(copy, tmp_path, name):
    (tmp_path / "outside.bin").write_bytes(b"x" * 12345)
    meta = _meta(copy)
    meta["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    _write_meta(copy, meta)
    with pytest.raises(fxpress.ArtifactError, match="not a plain relative path") as caught:
        fxpress.load(copy)
    assert "12345" not in str(caught.value)


def test_a_symlinked_file_is_refused(copy, tmp_path):
    elsewhere = tmp_path / "plan.json"
    shutil.move(copy / "plan.json", elsewhere)
    os.symlink(elsewhere, copy / "plan.json")  # same bytes, same hash: still refused
    with pytest.raises(fxpress.ArtifactError, match="symbolic link"):
        fxpress.load(copy)


def test_sizes_are_checked_before_reading(copy):
    with open(copy / "weights.safetensors", "r+b") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GiB that would be read whole
    meta = _meta(copy)
    meta["files"]["weights.safetensors"]["bytes"] = 1
    _write_meta(copy, meta)
    with pytest.raises(fxpress.ArtifactError, match="is 3221225472 bytes; meta.json records 1"):
        fxpress.load(copy)


def _set(path: str, value):
    def edit(meta):
        *parents, last = path.split(".")
        target = meta
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[int(last) if isinstance(target, list) else last] = value
    return edit


_DELETE = object()
CRAFTED = {
    "files not an object": (_set("files", ["wrapper.py"]), "files"),
    "file size a string": (lambda m: m["files"].update({"wrapper.py": {"bytes": "1", "sha256": "x"}}), "files"),
    "constants missing": (_set("constants", _DELETE), "constants"),
    "input dtype not a dtype": (_set("inputs.0.dtype", "load"), "inputs\\[0\\].dtype"),
    "input index out of range": (_set("runtime_inputs", [["input", 99]]), "runtime_inputs\\[0\\]"),
    "runtime input of another kind": (_set("runtime_inputs", [["exec", "x"]]), "runtime_inputs\\[0\\]"),
    "constant larger than stored": (lambda m: m["constants"][next(iter(m["constants"]))].update(size=[10**12], stride=[1]),
                                    "constants"),
    "unknown policy": (_set("kv_states", [{"handle": 0, "policy": {"class": "Evil", "fields": {}}, "layer": 0,
                                            "max_len": 8, "where": "x"}]), "KV policy 'Evil'"),
    "policy with wrong fields": (_set("kv_states", [{"handle": 0, "policy": {"class": "KIVI", "fields": {"bits": "x"}},
                                                      "layer": 0, "max_len": 8, "where": "x"}]), "policy"),
    "in_spec garbage": (_set("in_spec", "garbage"), "in_spec"),
    "out_spec of the wrong shape": (_set("out_spec", "[1, {}]"), "out_spec"),
    "device unknown": (_set("device", "quantum"), "device"),
    "target unknown": (_set("target", "python"), "target"),
    "versions incomplete": (_set("versions", {"fxpress": "0"}), "versions"),
    "symbols of the wrong type": (_set("symbols", {"s0": "x"}), "symbols"),
    "negative size": (lambda m: m["files"]["wrapper.py"].update(bytes=-1), "files"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_meta_fields_are_refused_by_name(copy, case):
    edit, field = CRAFTED[case]
    meta = _meta(copy)
    edit(meta)
    _write_meta(copy, meta)
    with pytest.raises(fxpress.ArtifactError, match=field):
        fxpress.load(copy)
