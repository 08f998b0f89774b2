"""Each store keeps what its policy says, attention over it equals attention over those tokens,
and the bytes it reports are the bytes it holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxpress.kv import KIVI, DuoAttentionKV, FullKV, HeavyHitterKV, StreamingKV
from fxpress.kv.attention import attend
from fxpress.kv.registry import make_store

B, HKV, HQ, D = 2, 2, 4, 32


def _tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, HKV, n, D, generator=g), torch.randn(B, HKV, n, D, generator=g)


def _store(policy, max_len=96, layer=0, dtype=torch.float32):
    return make_store(policy, layer, batch=B, kv_heads=HKV, head_dim=D, max_len=max_len, dtype=dtype,
                      device=torch.device("cpu"))


def _sdpa(q, k, v, keep=None):
    """Exact attention of the last query over the kept keys (``keep [B, Hkv, n]`` bool)."""
    mask = None if keep is None else keep.repeat_interleave(HQ // HKV, 1)[:, :, None, :]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1),
                                          attn_mask=mask)


def _feed(store, k, v, chunks):
    """Prefill ``chunks[0]`` tokens, then the rest a chunk at a time, through attend + append."""
    seen = 0
    q_all = torch.randn(B, HQ, k.shape[2], D, generator=torch.Generator().manual_seed(9))
    outs = []
    for size in chunks:
        sl = slice(seen, seen + size)
        out, mass = attend(store, q_all[:, :, sl], k[:, :, sl], v[:, :, sl], D ** -0.5)
        store.append(k[:, :, sl], v[:, :, sl], seen, mass)
        outs.append(out)
        seen += size
    return q_all, torch.cat(outs, 2)


def test_full_store_is_exact_causal_attention():
    k, v = _tokens(40)
    q, out = _feed(_store(FullKV()), k, v, [17, 1, 1, 21])
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert (out - expected).abs().max() <= 1e-5


def test_streaming_keeps_sinks_and_recent_tokens():
    k, v = _tokens(50)
    store = _store(StreamingKV(sink=3, recent=10))
    q, _ = _feed(store, k, v, [30, 1, 1, 1])
    assert store.filled == 13
    qn, kn, vn = torch.randn(B, HQ, 1, D), *_tokens(1, seed=5)
    out, _ = attend(store, qn, kn, vn, D ** -0.5)
    kept = torch.zeros(B, HKV, 34, dtype=torch.bool)
    kept[:, :, :3] = kept[:, :, 23:] = True  # sinks 0-2, the last 10 of 33 seen, and the new token
    expected = _sdpa(qn, torch.cat([k[:, :, :33], kn], 2), torch.cat([v[:, :, :33], vn], 2), kept)
    assert (out - expected).abs().max() <= 1e-5


def test_heavy_hitters_follow_accumulated_attention():
    """Against a brute-force H2O: every step, add each key's attention (over the query group) to
    its score; when over budget, drop the lowest-scored key outside the recent window."""
    k, v = _tokens(30)
    budget, recent = 12, 4
    store = _store(HeavyHitterKV(budget=budget, recent=recent))
    q, out = _feed(store, k, v, [1] * 30)
    kept, score = [], {}
    expected = []
    for t in range(30):
        cand = kept + [t]
        logits = torch.einsum("bhgd,bhnd->bhgn", q[:, :, t].view(B, HKV, 2, D), k[:, :, cand]) * D ** -0.5
        p = logits.softmax(-1)
        expected.append(torch.einsum("bhgn,bhnd->bhgd", p, v[:, :, cand]).reshape(B, HQ, 1, D))
        mass = p.sum(2)
        for i, c in enumerate(cand):
            score[c] = score.get(c, 0) + mass[:, :, i]
        kept = cand
        if len(kept) > budget:
            old = [c for c in kept if c < t + 1 - recent]
            # per (batch, head) choices differ; this reference tracks (batch 0, head 0)
            victim = min(old, key=lambda c: score[c][0, 0].item())
            kept = [c for c in kept if c != victim]
    assert (out[0, :2] - torch.cat(expected, 2)[0, :2]).abs().max() <= 1e-5
    positions = sorted(store.position[0, 0].tolist())
    assert positions == kept


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_attention_equals_attention_over_its_dequantised_tokens(bits):
    k, v = _tokens(80)
    store = _store(KIVI(bits=bits, group_size=16, residual=16, sink=2), max_len=96)
    _feed(store, k, v, [60, 1, 1, 1, 1])
    assert store.sunk == 2 and store.quantised % 16 == 0 and 16 <= store.waiting < 32
    ks, vs = zip(*store.segments())
    kd, vd = torch.cat(ks, 2), torch.cat(vs, 2)
    assert kd.shape[2] == 64
    assert (kd[:, :, -store.waiting:] - k[:, :, 64 - store.waiting:64]).abs().max() <= 1e-3  # fp16 residual
    qn, kn, vn = torch.randn(B, HQ, 1, D), *_tokens(1, seed=5)
    out, _ = attend(store, qn, kn, vn, D ** -0.5)
    expected = _sdpa(qn, torch.cat([kd, kn], 2), torch.cat([vd, vn], 2))
    assert (out - expected).abs().max() <= 1e-5
    error = (kd[:, :, 2:store.quantised + 2] - k[:, :, 2:store.quantised + 2]).abs().max()
    assert 0 < error < (1.0 if bits == 4 else 4.0)


def test_duo_attention_splits_heads_into_full_and_streaming():
    k, v = _tokens(40)
    store = _store(DuoAttentionKV(retrieval_heads=((1,),), sink=2, recent=5), max_len=64)
    _feed(store, k, v, [30, 1])
    (full_heads, full), (stream_heads, streaming) = store.parts
    assert full_heads.tolist() == [1] and stream_heads.tolist() == [0]
    assert full.filled == 31 and streaming.filled == 7
    assert store.nbytes() == full.nbytes() + streaming.nbytes()


@pytest.mark.parametrize("policy", [FullKV(), KIVI(bits=2, group_size=16, residual=16), StreamingKV(sink=2, recent=8),
                                    HeavyHitterKV(budget=16, recent=4, bits=4, group_size=16)])
def test_reported_bytes_are_the_bytes_allocated(policy):
    store = _store(policy, dtype=torch.float16)
    tensors = [t for t in vars(store).values() if isinstance(t, torch.Tensor)]
    for rows in (getattr(store, "keys", None), getattr(store, "values", None)):
        if rows is not None:
            tensors += list(rows.tensors.values())
    assert store.nbytes() == sum(t.nbytes for t in tensors)


def test_kivi2_marginal_bytes_per_token_are_three_bits_an_element():
    """Codes 2 bits + (scale, min) in fp16 per 32 = 3 bits per element: 0.1875 of fp16."""
    short, long = (_store(KIVI(bits=2), max_len=n, dtype=torch.float16).nbytes() for n in (1024, 2048))
    fp16_per_token = B * HKV * 2 * D * 2
    assert (long - short) / 1024 / fp16_per_token == pytest.approx(0.1875)


def test_h2o_decode_kernel_matches_the_torch_bookkeeping(device):
    from fxpress.kv.kernels.eviction import h2o_decode_update

    k, v = _tokens(30)
    reference = _store(HeavyHitterKV(budget=12, recent=4))
    _feed(reference, k, v, [20])
    kernel = _store(HeavyHitterKV(budget=12, recent=4))
    _feed(kernel, k, v, [20])
    g = torch.Generator().manual_seed(4)
    kn, vn = torch.randn(B, HKV, 1, D, generator=g), torch.randn(B, HKV, 1, D, generator=g)
    mass = torch.rand(B, HKV, 13, generator=g)
    mass[0, 0, :4] = 0.0  # ties among old slots: the first one goes, as torch.argmin picks
    reference.append(kn, vn, 20, mass)
    on = {n: t.to(device) for n, t in (("score", kernel.score), ("position", kernel.position),
                                         ("keys", kernel.keys.tensors["data"]), ("values", kernel.values.tensors["data"]))}
    h2o_decode_update(on["score"], on["position"], mass.to(device), on["keys"], on["values"], kn.to(device),
                      vn.to(device), 20, 4)
    assert torch.equal(on["position"].cpu(), reference.position)
    assert torch.equal(on["score"].cpu(), reference.score)
    assert torch.equal(on["keys"].cpu(), reference.keys.tensors["data"])
    assert torch.equal(on["values"].cpu(), reference.values.tensors["data"])
