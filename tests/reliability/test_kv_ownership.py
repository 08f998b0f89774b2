"""Compressed KV state of compiled graphs belongs to the cache buffers: interleaved requests on one
model, two models through one backend, and the string form of the backend each get their own."""

from __future__ import annotations

import torch
from transformers import StaticCache

import fxpress
from fxpress.hf.cache_argument import cache_argument
from tests.tiny_models import tiny_llama, token_ids

MAX_LEN, NEW = 24, 6


class Request:
    """One sequence decoded greedily step by step through ``forward`` with its own StaticCache."""

    def __init__(self, model, forward, prompt):
        self.model, self.forward = model, forward
        self.cache = StaticCache(config=model.config, max_cache_len=MAX_LEN)
        self.ids, self.next = prompt, prompt
        self.position = 0

    @torch.no_grad()
    def step(self) -> None:
        t = self.next.shape[1]
        positions = torch.arange(self.position, self.position + t)
        logits = self.forward(input_ids=self.next, **cache_argument(self.cache), cache_position=positions,
                              position_ids=positions[None], use_cache=True).logits
        self.next = logits[:, -1:].argmax(-1)
        self.ids = torch.cat([self.ids, self.next], 1)
        self.position += t


def _alone(model, prompt):
    request = Request(model, model.forward, prompt)
    for _ in range(NEW):
        request.step()
    return request.ids


def _interleaved(requests):
    for _ in range(NEW):
        for request in requests:  # every prefill, then one decode step of each in turn
            request.step()
    return [r.ids for r in requests]


def _prompts():
    return [token_ids(batch=1, length=6), token_ids(batch=1, length=6).flip(1)]


def test_interleaved_requests_on_one_model_equal_eager():
    model = tiny_llama()
    prompts = _prompts()
    expected = [_alone(model, p) for p in prompts]
    compiled = torch.compile(model.forward, backend=fxpress.backend(kv=fxpress.FullKV()))
    got = _interleaved([Request(model, compiled, p) for p in prompts])
    assert fxpress.counters["compress_kv_cache"]["cache update -> sdpa => kv_attend"] > 0
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_two_models_through_one_backend_equal_eager():
    first, second = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1.5)  # other weights, other tokens
    prompt = _prompts()[0]
    expected = [_alone(first, prompt), _alone(second, prompt)]
    backend = fxpress.backend(kv=fxpress.FullKV())
    requests = [Request(m, torch.compile(m.forward, backend=backend), prompt) for m in (first, second)]
    got = _interleaved(requests)
    assert not torch.equal(expected[0], expected[1])
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_string_backend_shares_state_between_prefill_and_decode():
    model = tiny_llama()
    prompt = _prompts()[0]
    expected = _alone(model, prompt)
    compiled = torch.compile(model.forward, backend="fxpress", options={"kv": fxpress.FullKV()})
    request = Request(model, compiled, prompt)
    for _ in range(NEW):
        request.step()
    assert fxpress.counters["compress_kv_cache"]["cache update -> sdpa => kv_attend"] > 0
    assert torch.equal(request.ids, expected)


def test_state_is_freed_with_its_cache():
    from fxpress.kv import graph_state

    model = tiny_llama()
    compiled = torch.compile(model.forward, backend=fxpress.backend(kv=fxpress.FullKV()))
    request = Request(model, compiled, _prompts()[0])
    request.step()
    sites = [s for s in graph_state._SITES.values() if s.live_sequences()]
    assert sites
    del request
    import gc

    gc.collect()
    assert all(s.live_sequences() == 0 for s in sites)
