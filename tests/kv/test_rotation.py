"""KIVI with rotated keys: the rotation is orthogonal, attention through a rotated store equals
attention over its (rotated) tokens, and keys with outlier channels quantise better rotated; and
both routes decode as eager does with keys rotated or pre-RoPE (``test_rope_frame.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxpress.kv import KIVI
from fxpress.kv.attention import attend
from fxpress.kv.registry import make_store
from fxpress.kv.rotation import hadamard_rotation

B, HKV, HQ, D = 2, 2, 4, 32


def _store(policy, max_len=96):
    return make_store(policy, 0, batch=B, kv_heads=HKV, head_dim=D, max_len=max_len, dtype=torch.float32,
                      device=torch.device("cpu"))


def _outlier_keys(n, seed=0):
    """Keys with two channels 20x the others, as LLM keys have (KIVI's reason for per-channel groups)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, n, D, generator=g)
    k[..., [3, 17]] *= 20
    return k, torch.randn(B, HKV, n, D, generator=g)


@pytest.mark.parametrize("d", [1, 2, 16, 64, 128])
def test_the_rotation_is_orthogonal_in_float64(d):
    r = hadamard_rotation(d)
    assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(r.abs(), torch.full((d, d), d ** -0.5, dtype=torch.float64))  # energy spread evenly


def test_a_head_dimension_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_rotation(48)
    with pytest.raises(ValueError, match="power of two"):
        make_store(KIVI(bits=2, group_size=16, rotate=True), 0, batch=1, kv_heads=1, head_dim=48, max_len=64,
                   dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(Exception, match="rotate must be a bool"):
        KIVI(rotate=1)


def test_rotated_store_attention_equals_exact_attention_before_quantisation():
    k, v = _outlier_keys(24)
    store = _store(KIVI(bits=2, group_size=16, residual=32, sink=0, rotate=True))
    q = torch.randn(B, HQ, 24, D, generator=torch.Generator().manual_seed(3))
    out, _ = attend(store, q[:, :, :20], k[:, :, :20], v[:, :, :20], D ** -0.5)
    store.append(k[:, :, :20], v[:, :, :20], 0)
    assert store.quantised == 0  # every token still exact (in the window), only rotated
    step, _ = attend(store, q[:, :, 20:21], k[:, :, 20:21], v[:, :, 20:21], D ** -0.5)
    expected = F.scaled_dot_product_attention(q[:, :, :21], k[:, :, :21].repeat_interleave(2, 1),
                                              v[:, :, :21].repeat_interleave(2, 1), is_causal=True)
    assert (torch.cat([out, step], 2) - expected).abs().max() <= 1e-5


def test_a_rotated_store_decodes_over_its_dequantised_keys_turned_back():
    """After quantisation: a decode step (the C++ decode kernel where a compiler works) equals exact
    attention over the stored keys rotated back, and the rotation adds no bytes."""
    k, v = _outlier_keys(80)
    sizes = {}
    for rotate in (False, True):
        store = _store(KIVI(bits=2, group_size=16, residual=16, sink=2, rotate=rotate))
        store.append(k[:, :, :64], v[:, :, :64], 0)
        sizes[rotate] = store.nbytes()
    assert store.quantised == 32 and sizes[True] == sizes[False]
    keys, values = (torch.cat(parts, 2) for parts in zip(*store.segments()))
    turned_back = keys @ store.rotation.T
    assert (turned_back - k[:, :, :64]).abs().max() > 0.1  # quantised: not the keys themselves
    q = torch.randn(B, HQ, 1, D, generator=torch.Generator().manual_seed(5))
    out, _ = attend(store, q, k[:, :, 64:65], v[:, :, 64:65], D ** -0.5)
    expected = F.scaled_dot_product_attention(q, torch.cat([turned_back, k[:, :, 64:65]], 2).repeat_interleave(2, 1),
                                              torch.cat([values, v[:, :, 64:65]], 2).repeat_interleave(2, 1))
    assert (out - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("frame", ["rotated", "pre-RoPE"])
@pytest.mark.parametrize("route", ["kv_cache", "compiled StaticCache"])
def test_both_routes_generate_eagers_tokens_with_8_bit_keys_in_another_frame(route, frame):
    """Rotated and pre-RoPE keys on a real decode path: 40 prompt tokens (24 of them quantised) and 8
    new ones, by ``fxpress.kv_cache`` and by the compress_kv_cache pass; 8-bit codes keep greedy
    decoding exact."""
    from transformers import StaticCache

    import fxpress
    from fxpress.hf.cache_argument import cache_argument
    from tests.tiny_models import tiny_llama, token_ids

    model, ids = tiny_llama(), token_ids(batch=2, length=40)
    frame = {"rotated": dict(rotate=True), "pre-RoPE": dict(rope_theta=model.config.rope_parameters["rope_theta"])}[frame]
    policy = KIVI(bits=8, group_size=16, residual=16, sink=0, **frame)

    def generate(cache):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_argument(cache),
                                  max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)

    expected = generate(StaticCache(config=model.config, max_cache_len=64))
    if route == "kv_cache":
        got = generate(fxpress.kv_cache(model, max_len=64, policy=policy, dtype=None))
    else:
        torch._dynamo.reset()
        forward = model.forward
        model.forward = torch.compile(forward, backend=fxpress.backend(kv=policy))
        try:
            got = generate(StaticCache(config=model.config, max_cache_len=64))
        finally:
            model.forward = forward
        assert fxpress.counters["compress_kv_cache"]["cache update -> sdpa => kv_attend"] > 0
    assert torch.equal(got, expected)
