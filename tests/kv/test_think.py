"""ThinK: the channels chosen are the ones its score ranks first, attention over a pruned store is
exact attention with those key channels zeroed for older tokens, it composes with KIVI, and the
bytes it reports are the bytes it holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxpress
from fxpress.core.errors import OptionError
from fxpress.kv import KIVI, FullKV, HeavyHitterKV, StreamingKV, ThinKV
from fxpress.kv.channel_pruning import ChannelPruner
from fxpress.kv.registry import make_store
from fxpress.kv.sequence import KVSequence
from tests.tiny_models import tiny_llama, token_ids

B, HKV, HQ, D = 2, 2, 4, 32


def _tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, HKV, n, D, generator=g), torch.randn(B, HKV, n, D, generator=g), \
        torch.randn(B, HQ, n, D, generator=g)


def _run(policy, chunks, seed=0):
    """Outputs of a KVSequence fed ``chunks`` (prefill, then decode steps), and the sequence."""
    k, v, q = _tokens(sum(chunks), seed)
    sequence = KVSequence(policy, 0, 128, "test")
    sequence.start(k, torch.float32)
    outs, seen = [], 0
    for size in chunks:
        sl = slice(seen, seen + size)
        outs.append(sequence.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], D ** -0.5))
        seen += size
    return torch.cat(outs, 2), sequence, (q, k, v)


def test_the_pruner_keeps_the_channels_with_the_largest_query_times_key_energy():
    pruner = ChannelPruner(kept=2, window=4, batch=1, heads=1, head_dim=4, device=torch.device("cpu"))
    q = torch.tensor([1.0, 3.0, 1.0, 2.0]).expand(1, 2, 6, 4)  # two query heads share the KV head
    keys = torch.tensor([4.0, 1.0, 2.0, 1.0]).expand(1, 1, 5, 4)
    pruner.observe(q)
    # scores: 1*16, 9*1, 1*4, 4*1 -> channels 0 and 1
    assert pruner.choose(keys).tolist() == [[[0, 1]]]
    pruned = pruner.gather(keys)
    assert pruned.shape == (1, 1, 5, 2) and torch.equal(pruner.scatter(pruned, 4)[..., 2:], torch.zeros(1, 1, 5, 2))


def test_ratio_zero_is_full_attention():
    expected, _, _ = _run(FullKV(), [40, 1, 1, 1])
    out, _, _ = _run(ThinKV(ratio=0.0, recent=8), [40, 1, 1, 1])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_pruned_attention_is_exact_attention_over_keys_with_the_dropped_channels_zeroed():
    policy = ThinKV(ratio=0.5, recent=8, window=16)
    out, sequence, (q, k, v) = _run(policy, [40, 1, 1, 1])
    channels = sequence.store.pruner.channels
    assert channels.shape == (B, HKV, 16)
    # the choice: the last 16 prefill queries (a KV head's 2 query heads together) and all 40 keys
    q_energy = q[:, :, 24:40].square().reshape(B, HKV, 2, 16, D).mean((2, 3))
    score = q_energy * k[:, :, :40].square().mean(2)
    assert torch.equal(channels, score.topk(16, -1).indices.sort(-1).values)
    kept = torch.zeros(B, HKV, 1, D, dtype=torch.bool).scatter_(3, channels[:, :, None], True)
    for step, position in enumerate(range(40, 43)):
        # older than the newest 8 stored keys: pruned; the newest and the query's own chunk: whole
        pruned_upto = max(position - 8, 0)
        keys = k[:, :, :position + 1].clone()
        keys[:, :, :pruned_upto] = keys[:, :, :pruned_upto] * kept
        expected = F.scaled_dot_product_attention(q[:, :, position:position + 1], keys.repeat_interleave(2, 1),
                                                  v[:, :, :position + 1].repeat_interleave(2, 1))
        torch.testing.assert_close(out[:, :, 40 + step:41 + step], expected, rtol=0, atol=1e-5)


def test_bytes_are_the_pruned_keys_the_recent_window_the_values_and_the_index():
    store = make_store(ThinKV(ratio=0.25, recent=16), 0, batch=B, kv_heads=HKV, head_dim=D, max_len=100,
                       dtype=torch.float16, device=torch.device("cpu"))
    _, sequence, _ = _run(ThinKV(ratio=0.25, recent=16), [40])
    kept = D - D // 4
    assert sequence.store.pruner.channels is not None
    after_choice = sequence.store.nbytes()
    assert after_choice == (112 * kept + 16 * D + 128 * D) * B * HKV * 4 + B * HKV * kept * 4
    assert store.nbytes() == (84 * kept + 16 * D + 100 * D) * B * HKV * 2 + store.pruner.query_squares.nbytes


def test_with_kivi_the_kept_channels_are_quantised_and_the_cache_shrinks():
    kivi = KIVI(bits=8, group_size=8, residual=8, sink=0)
    out, sequence, (q, k, v) = _run(ThinKV(ratio=0.5, kivi=kivi), [40, 1, 1, 1])
    store = sequence.store
    # 40 prefill keys: the oldest 32 quantised (KIVI's window keeps 8 to 15 whole), on 16 channels
    assert store.k_codes.shape[-1] == D // 2 and store.quantised == 32
    kept = torch.zeros(B, HKV, 1, D, dtype=torch.bool).scatter_(3, store.pruner.channels[:, :, None], True)
    for step, position in enumerate(range(40, 43)):
        keys = k[:, :, :position + 1].clone()
        keys[:, :, :32] = keys[:, :, :32] * kept
        expected = F.scaled_dot_product_attention(q[:, :, position:position + 1], keys.repeat_interleave(2, 1),
                                                  v[:, :, :position + 1].repeat_interleave(2, 1))
        # 8-bit codes: close to exact attention over the pruned keys
        assert (out[:, :, 40 + step:41 + step] - expected).abs().max() < 0.02
    _, plain, _ = _run(kivi, [40, 1, 1, 1])
    assert store.nbytes() < plain.store.nbytes()


@pytest.mark.parametrize("bad, message", [
    (dict(ratio=1.0), "ratio must be in"),
    (dict(recent=0), "recent must be a positive int"),
    (dict(kivi=FullKV()), "kivi must be a fxpress.KIVI"),
    (dict(kivi=KIVI(rotate=True)), "leaves no channel to prune"),
    (dict(evict=KIVI()), "evict must be a fxpress.StreamingKV or HeavyHitterKV"),
])
def test_bad_options_are_refused_where_they_are_written(bad, message):
    with pytest.raises(OptionError, match=message):
        ThinKV(**bad)


@pytest.mark.parametrize("policy", [ThinKV(ratio=0.5, recent=8),
                                    ThinKV(ratio=0.5, kivi=KIVI(bits=4, group_size=8, residual=8)),
                                    ThinKV(ratio=0.5, evict=HeavyHitterKV(budget=24, recent=8))])
def test_both_routes_generate_the_same_tokens(policy):
    model, ids = tiny_llama(), token_ids(1, 40)
    with torch.no_grad():
        cached = model.generate(ids, past_key_values=fxpress.kv_cache(model, max_len=64, policy=policy),
                                max_new_tokens=8, do_sample=False)
        eager_forward = model.forward
        model.forward = torch.compile(eager_forward, backend=fxpress.backend(kv=policy))
        before = dict(fxpress.counters["compress_kv_cache"])
        in_graph = model.generate(ids, cache_implementation="static", max_new_tokens=8, do_sample=False)
        model.forward = eager_forward
    assert dict(fxpress.counters["compress_kv_cache"]) != before  # the pass rewrote the attention
    assert torch.equal(in_graph, cached)


def test_with_eviction_the_kept_tokens_hold_pruned_keys():
    """ThinK over StreamingKV: attention is exact attention over the sinks and the recent window,
    every stored key with the dropped channels zeroed, the new token's whole."""
    policy = ThinKV(ratio=0.5, window=8, evict=StreamingKV(sink=2, recent=10))
    out, sequence, (q, k, v) = _run(policy, [30, 1, 1])
    store = sequence.store
    assert store.filled == 12 and store.inner.keys.head_dim == D // 2
    kept = torch.zeros(B, HKV, 1, D, dtype=torch.bool).scatter_(3, store.pruner.channels[:, :, None], True)
    # the choice: this chunk's last 8 queries and its 30 keys
    q_energy = q[:, :, 22:30].square().reshape(B, HKV, 2, 8, D).mean((2, 3))
    chosen = (q_energy * k[:, :, :30].square().mean(2)).topk(16, -1).indices.sort(-1).values
    assert torch.equal(store.pruner.channels, chosen)
    position = 31  # the last step: stored are tokens 0-1 and 21-30 (the window of 10 after token 30)
    stored = [0, 1] + list(range(21, 31))
    keys = torch.cat([k[:, :, stored] * kept, k[:, :, position:position + 1]], 2)
    values = torch.cat([v[:, :, stored], v[:, :, position:position + 1]], 2)
    expected = F.scaled_dot_product_attention(q[:, :, position:position + 1], keys.repeat_interleave(2, 1),
                                              values.repeat_interleave(2, 1))
    torch.testing.assert_close(out[:, :, 31:32], expected, rtol=0, atol=1e-5)


def test_with_heavy_hitters_the_cache_is_smaller_and_runs_both_routes():
    h2o = HeavyHitterKV(budget=16, recent=8)
    _, plain, _ = _run(h2o, [40, 1, 1])
    _, pruned, _ = _run(ThinKV(ratio=0.5, evict=h2o), [40, 1, 1])
    assert pruned.store.filled == plain.store.filled == 16
    assert pruned.store.nbytes() < plain.store.nbytes()
    with pytest.raises(OptionError, match="not both"):
        ThinKV(kivi=KIVI(), evict=h2o)
