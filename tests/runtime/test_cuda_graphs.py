"""CUDA graph replay (``Options(cuda_graphs=True)``): which graphs may replay, the arena a capture
keeps apart, and, on a GPU, replays that equal eager across inputs, layouts and threads."""

from __future__ import annotations

import threading

import pytest
import torch

import fxpress
from fxpress.core.errors import OptionError
from fxpress.runtime.cuda_graphs import CudaGraphRunner
from fxpress.runtime.wrapper_support import ArenaPool

from tests.tiny_models import tiny_bert, token_ids


def _reports(model, *args, **options):
    reports = []
    compiled = torch.compile(model, backend=fxpress.Backend(fxpress.Options(**options), on_report=reports.append))
    with torch.no_grad():
        out = compiled(*args)
    return compiled, out, reports


class _Writer(torch.nn.Module):
    """Writes its cache input in place, as a KV cache update does."""

    def forward(self, x, cache):
        cache[:, : x.shape[1]] = x * 2
        return cache.sum(-1)


def test_option_is_validated_and_reduce_overhead_mode_turns_it_on():
    with pytest.raises(OptionError, match="cuda_graphs"):
        fxpress.Options(cuda_graphs="yes")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    x = torch.randn(3, 8)
    compiled = torch.compile(model, backend="fxpress", mode="reduce-overhead")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_a_cpu_graph_runs_plainly_and_says_why():
    model = tiny_bert()
    _, out, reports = _reports(model, token_ids(batch=2, length=8), target="cpu", cuda_graphs=True)
    assert reports[-1].cuda_graphs.startswith("off: ") and "not a CUDA device" in reports[-1].cuda_graphs
    assert "CUDA graph replay: off" in fxpress.explain(model, token_ids(batch=2, length=8), cuda_graphs=True).__str__()


def test_a_graph_that_writes_its_input_is_never_replayed():
    x, cache = torch.randn(2, 3, 4), torch.zeros(2, 5, 4)
    _, _, reports = _reports(_Writer(), x, cache, target="cpu", cuda_graphs=True)
    assert "writes its argument" in reports[-1].cuda_graphs, reports[-1].cuda_graphs
    torch.testing.assert_close(cache[:, :3], x * 2)  # the update reached the caller's tensor


def test_without_the_option_nothing_is_said():
    _, _, reports = _reports(tiny_bert(), token_ids(batch=1, length=8), target="cpu")
    assert reports[-1].cuda_graphs == ""


def test_cpu_inputs_run_the_plain_call():
    calls = []
    runner = CudaGraphRunner(lambda inputs: calls.append(len(inputs)) or "plain", ArenaPool(), "graph 0")
    assert runner([torch.ones(2), 3]) == "plain" and runner([torch.ones(2), 3]) == "plain"
    assert calls == [2, 2]


def test_an_arena_kept_apart_is_neither_taken_from_nor_given_to_the_pool():
    pool = ArenaPool()
    assert pool.take("k") is None
    pool.give_back("k", "shared")
    seen = {}
    with pool.kept_apart():
        seen["inside"] = pool.take("k")
        pool.give_back("k", "captured")
        other = threading.Thread(target=lambda: seen.__setitem__("other thread", pool.take("k")))
        other.start()
        other.join()
    assert seen == {"inside": None, "other thread": "shared"}
    assert pool.take("k") is None  # "captured" never entered the pool


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.gpu
def test_replays_equal_eager_for_new_inputs_and_layouts():
    _cuda_or_skip()
    model = tiny_bert().cuda()
    compiled, _, reports = _reports(model, token_ids(batch=2, length=8).cuda(), target="triton", cuda_graphs=True)
    assert reports[-1].cuda_graphs == "on"
    results = []
    with torch.no_grad():
        for seed in range(4):
            for length in (8, 12):  # two layouts, each captured on its second call
                ids = token_ids(batch=2, length=length, seed=seed).cuda()
                got = compiled(ids).last_hidden_state
                results.append((got, model(ids).last_hidden_state))
    for got, expected in results:  # earlier results were not overwritten by later replays
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert fxpress.counters["cuda_graphs"]["captured"] >= 2  # (Dynamo may compile a graph per length)
    assert fxpress.counters["cuda_graphs"]["replays"] >= 5


@pytest.mark.gpu
def test_replays_from_threads_equal_eager():
    _cuda_or_skip()
    model = tiny_bert().cuda()
    compiled = torch.compile(model, backend=fxpress.backend(cuda_graphs=True))
    inputs = [token_ids(batch=2, length=8, seed=s).cuda() for s in range(6)]
    with torch.no_grad():
        expected = [model(x).last_hidden_state for x in inputs]
        for x in inputs[:2]:
            compiled(x)  # seen, then captured
    wrong, errors = [], []

    def serve(worker: int) -> None:
        try:
            stream = torch.cuda.Stream()
            with torch.no_grad(), torch.cuda.stream(stream):
                for call in range(12):
                    i = (worker + call) % len(inputs)
                    got = compiled(inputs[i]).last_hidden_state
                    stream.synchronize()
                    if not torch.allclose(got, expected[i], atol=1e-4, rtol=1e-4):
                        wrong.append((worker, call))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong, (errors[:2], wrong[:4])
    assert fxpress.counters["cuda_graphs"]["replays"] >= 40, dict(fxpress.counters["cuda_graphs"])
