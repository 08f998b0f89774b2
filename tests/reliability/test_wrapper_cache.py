"""The wrapper cache folder is data, never code to import: planted or corrupted files do not run,
unsafe folders are refused, and an unusable folder falls back to memory with a warning."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import pytest
import torch

from fxpress.runtime import wrapper_cache
from fxpress.core import cache_folder
from fxpress.core.cache_folder import CacheFolderWarning
from tests.tiny_models import tiny_bert, token_ids


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(folder))
    monkeypatch.setattr(cache_folder, "_warned", set())
    return folder


def _compile_and_check(model, ids):
    import itertools

    from fxpress.compiler import backend

    torch._dynamo.reset()
    backend._graph_ids = itertools.count()  # graph numbers are in the source: the same file names again
    with torch.no_grad():
        got = torch.compile(model, backend="fxpress")(ids).last_hidden_state
        assert torch.allclose(got, model(ids).last_hidden_state, atol=1e-5)


def _wrappers(folder):
    return sorted((folder / "wrappers").glob("w*.py"))


@pytest.mark.parametrize("tamper", ["planted code", "garbage", "truncated"])
def test_a_changed_cached_wrapper_never_runs_and_is_rewritten(cache_dir, tmp_path, tamper):
    model, ids = tiny_bert(), token_ids()
    _compile_and_check(model, ids)
    files = _wrappers(cache_dir)
    assert files
    originals = {f: f.read_bytes() for f in files}
    marker = tmp_path / "marker"
    for f in files:
        if tamper == "planted code":
            f.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef call(args):\n    return (0,)\n")
        elif tamper == "garbage":
            f.write_bytes(b"\x00\xff def (((")
        else:
            f.write_bytes(originals[f][: len(originals[f]) // 2])
    _compile_and_check(model, ids)
    assert not marker.exists()
    assert {f: f.read_bytes() for f in files} == originals


def test_a_folder_others_can_write_is_refused(cache_dir):
    os.chmod(cache_dir, 0o777)
    model, ids = tiny_bert(), token_ids()
    with pytest.warns(CacheFolderWarning, match="writable by group or others"):
        _compile_and_check(model, ids)
    assert not (cache_dir / "wrappers").exists() or not _wrappers(cache_dir)


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown needs root")
def test_a_folder_owned_by_another_user_is_refused(cache_dir):
    os.chown(cache_dir, 65534, 65534)
    with pytest.warns(CacheFolderWarning, match="owned by another user"):
        _compile_and_check(tiny_bert(), token_ids())


def test_an_unusable_folder_falls_back_to_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(cache_folder, "_warned", set())
    with pytest.warns(CacheFolderWarning, match="cannot be made"):
        _compile_and_check(tiny_bert(), token_ids())


def test_a_full_disk_falls_back_to_memory(cache_dir, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_folder.tempfile, "mkstemp", full)
    with pytest.warns(CacheFolderWarning, match="No space left"):
        _compile_and_check(tiny_bert(), token_ids())


def test_triton_kernels_run_from_memory_without_a_cache_folder(cache_dir, monkeypatch):
    import fxpress

    os.chmod(cache_dir, 0o777)
    model, ids = tiny_bert(), token_ids(batch=1, length=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheFolderWarning)
        with torch.no_grad():
            got = torch.compile(model, backend=fxpress.backend(target="triton"))(ids).last_hidden_state
    assert torch.allclose(got, model(ids).last_hidden_state, atol=1e-4)


def _write_many(folder: str, source: str) -> None:
    for _ in range(50):
        assert wrapper_cache._keep_copy(wrapper_cache.Path(folder), "wsame", source.encode()) is not None


def test_processes_writing_the_same_wrapper_do_not_collide(cache_dir):
    folder = cache_dir / "wrappers"
    folder.mkdir(mode=0o700)
    sources = [f"x = {i}\n" * 2000 for i in range(4)]
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_many, args=(str(folder), s)) for s in sources]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [w.exitcode for w in workers] == [0] * 4
    assert (folder / "wsame.py").read_text() in sources  # whole, from one writer
    assert not list(folder.glob("*.partial"))
