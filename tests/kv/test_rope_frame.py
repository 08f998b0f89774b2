"""KIVI with pre-RoPE keys (``KIVI(rope_theta=...)``, KVQuant): the turn back and forth is exact,
a store's attention equals attention over its dequantised keys turned to their positions, and keys
with outlier channels quantise better before the rotary embedding. Both routes decode as eager does
with pre-RoPE keys: ``test_rotation.py``, beside rotated keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxpress.core.errors import OptionError
from fxpress.kv import KIVI, rope_frame
from fxpress.kv.attention import attend
from fxpress.kv.registry import make_store
from fxpress.kv.think import ThinKV

B, HKV, HQ, D, THETA = 2, 2, 4, 32, 10000.0


def _store(policy, max_len=96, dtype=torch.float32):
    return make_store(policy, 0, batch=B, kv_heads=HKV, head_dim=D, max_len=max_len, dtype=dtype,
                      device=torch.device("cpu"))


def _roped_outlier_keys(n, seed=0):
    """Keys with two channels offset by 20 before the rotary embedding (LLM keys have channels large
    for every token, KVQuant's reason for quantising before it), then turned to their positions
    0 .. n-1 as the model does (transformers' rotate_half)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, n, D, generator=g)
    k[..., [0, 1]] += 20  # fast-turning channels: each swings fully into its partner within a group
    inv_freq = 1.0 / THETA ** (torch.arange(0, D, 2).float() / D)  # as LlamaRotaryEmbedding computes them
    angles = torch.arange(n).float()[:, None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotate_half = torch.cat([-k[..., D // 2:], k[..., :D // 2]], -1)
    return k * cos + rotate_half * sin, torch.randn(B, HKV, n, D, generator=g), k


def test_the_turn_matches_transformers_rotary_embedding_and_its_inverse_undoes_it():
    roped, _, raw = _roped_outlier_keys(200)
    tolerance = 4e-7 * float(raw.abs().max())  # a few float32 roundings of the largest channel
    assert (rope_frame.turn(raw, THETA, 0, inverse=False) - roped).abs().max() <= tolerance
    assert (rope_frame.turn(roped, THETA, 0, inverse=True) - raw).abs().max() <= tolerance
    # From any start: positions 150 .. 199 alone.
    assert (rope_frame.turn(roped[:, :, 150:], THETA, 150, inverse=True) - raw[:, :, 150:]).abs().max() <= tolerance


def test_keys_with_outlier_channels_quantise_better_before_the_rotary_embedding():
    roped, v, _ = _roped_outlier_keys(96)
    errors = {}
    for theta in (None, THETA):
        store = _store(KIVI(bits=2, group_size=16, residual=16, sink=0, rope_theta=theta))
        store.append(roped, v, 0)
        keys = torch.cat([k for k, _ in store.segments()], 2)
        errors[theta] = float((keys - roped[:, :, :keys.shape[2]]).pow(2).mean())
    assert store.quantised == 80
    assert errors[THETA] < 0.2 * errors[None], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_pre_rope_store_decodes_over_its_dequantised_keys_at_their_positions(dtype):
    """A decode step (the C++ decode kernel where a compiler works) equals exact attention over the
    keys the store's segments give back (dequantised, turned to their positions), with sinks and a
    window, and pre-RoPE keys add no bytes."""
    roped, v, _ = _roped_outlier_keys(80)
    sizes = {}
    for theta in (None, THETA):
        store = _store(KIVI(bits=2, group_size=16, residual=16, sink=3, rope_theta=theta), dtype=dtype)
        store.append(roped[:, :, :50].to(dtype), v[:, :, :50].to(dtype), 0)
        store.append(roped[:, :, 50:64].to(dtype), v[:, :, 50:64].to(dtype), 50)
        sizes[theta] = store.nbytes()
    assert store.quantised == 32 and store.sunk == 3 and sizes[THETA] == sizes[None]
    keys, values = (torch.cat(parts, 2) for parts in zip(*store.segments()))
    assert (keys - roped[:, :, :64]).abs().max() > 0.1  # quantised: not the keys themselves
    q = torch.randn(B, HQ, 1, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    kn, vn = roped[:, :, 64:65].to(dtype), v[:, :, 64:65].to(dtype)
    out, _ = attend(store, q, kn, vn, D ** -0.5)
    expected = F.scaled_dot_product_attention(q.float(), torch.cat([keys, kn.float()], 2).repeat_interleave(2, 1),
                                              torch.cat([values, vn.float()], 2).repeat_interleave(2, 1))
    assert (out.float() - expected).abs().max() <= 1e-3 if dtype == torch.float16 else 1e-5


def test_options_that_cannot_hold_pre_rope_keys_are_refused():
    for theta in (0.5, float("nan"), "10000", True):
        with pytest.raises(OptionError, match="rope_theta"):
            KIVI(rope_theta=theta)
    with pytest.raises(OptionError, match="choose one"):
        KIVI(rotate=True, rope_theta=THETA)
    with pytest.raises(OptionError, match="both channels of every pair"):
        ThinKV(ratio=0.5, kivi=KIVI(rope_theta=THETA))
    assert "pre-RoPE keys (theta=10000)" in KIVI(rope_theta=THETA).describe()
