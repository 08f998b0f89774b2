"""What fxpress.load refuses, each with its own message: changed, truncated, missing or edited
files, other versions, and inputs of the wrong shape or dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.compiler import artifact
from fxpress.runtime.wrapper_support import InputError
from tests.aot.models import mlp


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A Triton-target artifact (so it has kernels/ files), run here in Triton's interpreter."""
    path = tmp_path_factory.mktemp("artifact") / "mlp"
    return fxpress.aot_compile(mlp(), (torch.randn(3, 16),), path, target="triton")


@pytest.fixture
def copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "copy"))


def _files(built: Path) -> list[str]:
    return sorted(json.loads((built / "meta.json").read_text())["files"])


def test_loads_and_matches_eager(built):
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(fxpress.load(built)(x), mlp()(x), rtol=1e-5, atol=1e-6)
    assert any(name.startswith("kernels/") for name in _files(built))


def test_every_kind_of_file_is_covered(built):
    kinds = {name.split("/")[0] for name in _files(built)}
    assert kinds == {"graph.txt", "graph.json", "wrapper.py", "plan.json", "weights.safetensors", "kernels"}


@pytest.mark.parametrize("name", ["graph.txt", "graph.json", "wrapper.py", "plan.json", "weights.safetensors",
                                  "kernels/"])
def test_a_flipped_byte_is_refused(built, copy, name):
    name = next(n for n in _files(built) if n.startswith(name))
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(fxpress.ArtifactError, match=f"{name} has changed since it was written"):
        fxpress.load(copy)


def test_a_truncated_file_is_refused(copy):
    data = (copy / "weights.safetensors").read_bytes()
    (copy / "weights.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(fxpress.ArtifactError, match=r"weights.safetensors is \d+ bytes; .*truncated"):
        fxpress.load(copy)


def test_a_deleted_file_is_refused(copy):
    (copy / "wrapper.py").unlink()
    with pytest.raises(fxpress.ArtifactError, match="missing wrapper.py"):
        fxpress.load(copy)


def test_a_missing_meta_json_is_refused(copy):
    (copy / "meta.json").unlink()
    with pytest.raises(fxpress.ArtifactError, match="missing meta.json"):
        fxpress.load(copy)


def test_a_flipped_byte_in_meta_json_is_refused(copy):
    data = bytearray((copy / "meta.json").read_bytes())
    at = data.index(b'"target"') + 3
    data[at] ^= 0x01
    (copy / "meta.json").write_bytes(bytes(data))
    with pytest.raises(fxpress.ArtifactError, match="meta.json was edited or corrupted"):
        fxpress.load(copy)


def test_an_edited_meta_json_is_refused(copy):
    meta = json.loads((copy / "meta.json").read_text())
    meta["inputs"][0]["shape"] = [5, 16]  # valid JSON, a plausible edit
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(fxpress.ArtifactError, match="meta.json was edited or corrupted: its checksum"):
        fxpress.load(copy)


@pytest.mark.parametrize("package,version", [("fxpress", "0.0.1"), ("torch", "1.13.1"), ("triton", "2.0.0")])
def test_other_versions_are_refused(copy, package, version):
    meta = json.loads((copy / "meta.json").read_text())
    meta["versions"][package] = version
    meta["checksum"] = artifact._checksum(meta)  # as if that version had written it
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(fxpress.ArtifactError, match=f"was compiled with {package} {version}; this is {package}"):
        fxpress.load(copy)


def test_another_format_is_refused(copy):
    meta = json.loads((copy / "meta.json").read_text())
    meta["format"] = 99
    meta["checksum"] = artifact._checksum(meta)
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(fxpress.ArtifactError, match=f"artifact format 99; this fxpress reads format {artifact.FORMAT}"):
        fxpress.load(copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(fxpress.ArtifactError, match="no such artifact folder"):
        fxpress.load(tmp_path / "nothing")


@pytest.mark.parametrize("value,message", [
    (torch.randn(4, 16), r"input args\[0\] must be float32\[3, 16\], got float32\[4, 16\]"),
    (torch.randn(3, 16).double(), r"input args\[0\] must be float32\[3, 16\], got float64\[3, 16\]"),
    (torch.randn(3, 16, 1), r"must be float32\[3, 16\], got float32\[3, 16, 1\]"),
    (7, r"must be float32\[3, 16\], got int"),
])
def test_wrong_inputs_are_refused(built, value, message):
    with pytest.raises(InputError, match=message):
        fxpress.load(built)(value)


def test_wrong_input_structure_is_refused(built):
    loaded = fxpress.load(built)
    with pytest.raises(InputError, match="takes keyword inputs"):
        loaded(torch.randn(3, 16), mask=torch.ones(3))
    with pytest.raises(InputError, match=r"takes inputs \['args\[0\]'\]"):
        loaded(torch.randn(3, 16), torch.randn(3, 16))
