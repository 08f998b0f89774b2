"""Building C++ kernels: the library cache's integrity rules, concurrent builds, and what happens
without a compiler (target='auto' runs the cpu target and says why; target='cpp' runs eagerly
with the reason)."""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

import pytest
import torch

import fxpress
from fxpress.core import cache_folder
from fxpress.native import build

pytestmark = pytest.mark.skipif(build.compiler_refusal() is not None, reason="no working C++ compiler")

SOURCE = 'extern "C" int add_one(int x) { return x + 1; }\n'
SIGNATURES = {"add_one": (ctypes.c_int, [ctypes.c_int])}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder and no library loaded in this process yet."""
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(cache_folder, "_warned", set())
    return tmp_path / "cache" / "native"


def _library_files(folder):
    return sorted(p for p in folder.iterdir() if p.name.startswith("add-"))


def test_a_library_is_built_once_and_loaded_from_the_cache(fresh_cache, monkeypatch):
    assert build.library("add", SOURCE, SIGNATURES).add_one(41) == 42
    so, record = _library_files(fresh_cache)[1], _library_files(fresh_cache)[0]
    assert so.suffix == ".so" and record.suffix == ".sha256"
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("rebuilt a trusted library"))
    assert build.library("add", SOURCE, SIGNATURES).add_one(1) == 2


@pytest.mark.parametrize("tamper", ["library", "record"])
def test_a_tampered_library_is_rebuilt_not_loaded(fresh_cache, monkeypatch, tamper):
    build.library("add", SOURCE, SIGNATURES)
    record, so = _library_files(fresh_cache)
    monkeypatch.setattr(build, "_loaded", {})
    # Renamed into place, as a planter would: writing into the loaded library would fault this process.
    cache_folder.write_atomically(so if tamper == "library" else record, b"planted")
    built = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: built.append(1) or real_compile(*a))
    assert build.library("add", SOURCE, SIGNATURES).add_one(2) == 3
    assert built == [1]
    assert record.read_text() == build._digest(so)


def test_an_unsafe_cache_folder_is_refused_and_kernels_still_build(fresh_cache):
    fresh_cache.mkdir(parents=True)
    os.chmod(fresh_cache, 0o777)
    with pytest.warns(cache_folder.CacheFolderWarning, match="writable by group or others"):
        assert build.library("add", SOURCE, SIGNATURES).add_one(5) == 6
    assert not _library_files(fresh_cache)


def test_threads_compiling_at_once_build_one_library(fresh_cache, monkeypatch):
    builds = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: builds.append(1) or real_compile(*a))
    results, start = [], threading.Barrier(4)

    def work():
        start.wait()
        results.append(build.library("add", SOURCE, SIGNATURES).add_one(7))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [8] * 4 and builds == [1]


def test_a_compile_error_names_the_library_and_the_compiler_message(fresh_cache):
    with pytest.raises(build.NativeBuildError, match=r"broken-.*error"):
        build.library("broken", "this is not C++", {})


def _quantized_mlp():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)).eval()
    return fxpress.compress.quantize(mlp, bits=4, group_size=32, skip=()).model


def test_auto_picks_cpp_on_cpu_when_the_compiler_works():
    torch._dynamo.reset()
    report = fxpress.explain(_quantized_mlp(), torch.randn(2, 64))
    assert report.graphs[0].target == "cpp" and not report.graphs[0].target_notes


def test_without_a_compiler_auto_falls_back_to_cpu_and_says_why(monkeypatch):
    monkeypatch.setenv("FXPRESS_CXX", "/nonexistent/c++")
    torch._dynamo.reset()
    report = fxpress.explain(_quantized_mlp(), torch.randn(2, 64))
    (graph,) = report.graphs
    assert graph.target == "cpu" and report.max_abs_diff < 1e-5
    assert "did not pick cpp" in str(report) and "/nonexistent/c++" in str(report)


def test_without_a_compiler_target_cpp_runs_eagerly_with_the_reason(monkeypatch):
    monkeypatch.setenv("FXPRESS_CXX", "/nonexistent/c++")
    torch._dynamo.reset()
    model, x = _quantized_mlp(), torch.randn(2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fxpress.explain(model, x, target="cpp")
    (graph,) = report.graphs
    assert "cannot build its kernels" in graph.fallback_reason and "/nonexistent/c++" in graph.fallback_reason
    assert report.max_abs_diff == 0
