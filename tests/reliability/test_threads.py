"""One compiled model called from a pool of threads: every call equals eager.

Each call takes an arena of its own (``fxpress.runtime.wrapper_support.ArenaPool``); before, one
module-level arena was shared by all callers and most concurrent calls came back wrong.
"""

from __future__ import annotations

import threading

import pytest
import torch

from fxpress.hf.cache_argument import cache_argument

from tests.tiny_models import tiny_bert, tiny_gpt2, token_ids

THREADS, CALLS = 4, 12


def _hidden(model, ids):
    out = model(ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _run_in_threads(work) -> None:
    """``work(i)`` on THREADS threads at once; any exception fails the test, naming the first."""
    errors = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_concurrent_calls_equal_eager(make):
    model = make()
    compiled = torch.compile(model, backend="fxpress")
    # Three sequence lengths: concurrent calls of one size share a graph; other sizes interleave.
    inputs = [token_ids(batch=2, length=10 + i % 3) for i in range(6)]
    with torch.no_grad():
        expected = [_hidden(model, x) for x in inputs]
        for x in inputs:
            _hidden(compiled, x)  # compile every graph before the threads start
    wrong = []

    def serve(worker: int) -> None:
        for call in range(CALLS):
            i = (worker + call) % len(inputs)
            with torch.no_grad():
                got = _hidden(compiled, inputs[i])
            if not torch.allclose(got, expected[i], atol=1e-5, rtol=1e-5):
                wrong.append((worker, call))

    _run_in_threads(serve)
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS} concurrent calls differ from eager"


def test_threads_generating_with_kv_caches_of_their_own_equal_eager():
    import fxpress
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    prompts = [token_ids(batch=1, length=6 + i) for i in range(THREADS)]

    def generate(ids, cache=None):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_argument(cache),
                                  max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)

    expected = [generate(p) for p in prompts]
    got = [None] * THREADS

    def serve(i: int) -> None:
        got[i] = generate(prompts[i], fxpress.kv_cache(model, max_len=64, policy=fxpress.FullKV(), dtype=None))

    _run_in_threads(serve)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def _cpp_model(kind: str):
    """A small MLP whose Linears run a cpp kernel: 4-bit LUT matmul, or one fused low-rank FFN."""
    import fxpress

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 64)).eval()
    if kind == "lut":
        return fxpress.compress.quantize(mlp, bits=4, group_size=32, skip=()).model
    return fxpress.compress.svd(mlp, rank_ratio=0.3).model


@pytest.mark.parametrize("kind", ["lut", "lowrank"])
def test_threads_calling_cpp_kernels_equal_one_thread(kind):
    """The cpp target's kernels (LUT matmul and the low-rank FFN, with their once-per-weight
    layouts made while other threads call) from many threads at once give what one thread gives,
    bit for bit."""
    import fxpress
    from fxpress.native import build
    from fxpress.ops.cpp import lowrank, lut

    if build.compiler_refusal() is not None:
        pytest.skip("no working C++ compiler")
    model = _cpp_model(kind)
    reports = []
    compiled = torch.compile(model, backend=fxpress.Backend(fxpress.Options(target="cpp"), on_report=reports.append))
    inputs = [torch.randn(1 + i % 3, 96) if i % 2 else torch.randn(60 + i, 96) for i in range(6)]
    with torch.no_grad():
        expected = [compiled(x) for x in inputs]  # compiles every graph; the layouts are made later too
    generated = {name for r in reports for name, kind_, _ in r.kernels if kind_ == "op"} - \
        {name for r in reports for name in r.not_generated}
    assert any(("lut" if kind == "lut" else "lowrank_ffn") in name for name in generated), generated
    lut.packed.clear()  # the threads race to make the weights' layouts again
    lowrank.panels.clear()
    wrong = []

    def serve(worker: int) -> None:
        for call in range(CALLS):
            i = (worker + call) % len(inputs)
            with torch.no_grad():
                if not torch.equal(compiled(inputs[i]), expected[i]):
                    wrong.append((worker, call))

    _run_in_threads(serve)
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS} concurrent calls differ"
