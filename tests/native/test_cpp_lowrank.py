"""The cpp target's low-rank kernels (fxpress/ops/cpp/lowrank.cpp, lowrank_attention.cpp) against
the unfused chains they replace. Linear and FFN: ragged rows, ranks and widths around the kernel's
blocks, both threading modes, every activation, gates, batches and strided inputs; the panel
layout follows in-place weight updates; the AVX2 and portable builds agree with the native one.
Attention: against SDPA over the rebuilt Q, K, V, with GQA, every mask kind, fewer queries than keys,
ragged head dims, the output factor, and strided outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fxpress.native import build
from fxpress.ops.cpp import lowrank as cpp_lowrank
from tests.conftest import max_diff
from tests.ops import rotary

lowrank = torch.ops.fxpress

pytestmark = pytest.mark.skipif(build.compiler_refusal() is not None, reason="no working C++ compiler")

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
               "relu": F.relu}


def _factors(n_in, rank, n_out, generator, bias=True):
    down = torch.randn(rank, n_in, generator=generator) / n_in ** 0.5
    up = torch.randn(n_out, rank, generator=generator) / rank ** 0.5
    return down, up, (torch.randn(n_out, generator=generator) if bias else None)


def _chain(x, down, up, bias):
    return F.linear(F.linear(x, down), up, bias)


def _relative(got, expected):
    return max_diff(got, expected) / max(1.0, float(expected.abs().max()))


# rows: 1 and 5 (panels split over threads), 47, 200 and 301 (tiles per thread, ragged last tile);
# widths and ranks off the 16-column panels; in_features 400 and 800: several 384-long k slices.
@pytest.mark.parametrize("rows", [1, 5, 47, 200, 301])
@pytest.mark.parametrize("n_in,rank,n_out", [(40, 9, 70), (400, 33, 17), (800, 130, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear_matches_the_chain(rows, n_in, rank, n_out, bias):
    g = torch.Generator().manual_seed(rows * n_in + rank)
    x = torch.randn(rows, n_in, generator=g)
    down, up, b = _factors(n_in, rank, n_out, g, bias)
    out = torch.empty(rows, n_out)
    assert cpp_lowrank.lowrank_linear(x, down, up, b, out) is out
    assert _relative(out, _chain(x, down, up, b)) < 1e-5


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rows", [3, 130])
def test_lowrank_ffn_matches_the_chain(activation, gated, rows):
    g = torch.Generator().manual_seed(rows + 7 * gated)
    x = torch.randn(2, rows, 48, generator=g)  # a batch: rows of both sequences
    first, second = _factors(48, 11, 200, g), _factors(200, 19, 48, g)
    gate = _factors(48, 13, 200, g) if gated else (None, None, None)
    act = ACTIVATIONS[activation]
    hidden = act(_chain(x, *gate)) * _chain(x, *first) if gated else act(_chain(x, *first))
    expected = _chain(hidden, *second)
    out = torch.empty(2, rows, 48)
    cpp_lowrank.lowrank_ffn(x, *first, *second, activation, *gate, out)
    assert _relative(out, expected) < 1e-5


def test_strided_input_and_output():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 30, generator=g).T  # [30, 64], column stride 30
    down, up, bias = _factors(64, 10, 50, g)
    out = torch.empty(50, 30).T  # not contiguous: written through a temporary
    cpp_lowrank.lowrank_linear(x, down, up, bias, out)
    assert _relative(out, _chain(x, down, up, bias)) < 1e-5


def test_results_do_not_depend_on_the_thread_count():
    """Tiles per thread or panels per thread: every output is summed in the same order."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(150, 64, generator=g)
    first, second = _factors(64, 20, 300, g), _factors(300, 20, 64, g)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for rows in (150, 4):
                out = torch.empty(rows, 64)
                results.append((rows, cpp_lowrank.lowrank_ffn(x[:rows], *first, *second, "gelu", None, None, None,
                                                               out)))
    finally:
        torch.set_num_threads(before)
    for rows, out in results:
        assert torch.equal(out, next(o for r, o in results if r == rows))


def test_the_panel_layout_follows_in_place_updates():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 32, generator=g)
    down, up, bias = _factors(32, 8, 40, g)
    out = torch.empty(8, 40)
    cpp_lowrank.lowrank_linear(x, down, up, bias, out)
    up.mul_(2)  # a new _version: the kept panels are stale
    cpp_lowrank.lowrank_linear(x, down, up, bias, out)
    assert _relative(out, _chain(x, down, up, bias)) < 1e-5


@pytest.mark.parametrize("build_name,prefix", [("portable", "#undef __AVX512F__\n#undef __AVX2__\n"),
                                               ("avx2", "#undef __AVX512F__\n")])
def test_narrower_builds_agree_with_the_native_one(build_name, prefix):
    native = Path(build.__file__).parent
    source = prefix + "".join((native / h).read_text() for h in cpp_lowrank.HEADERS) + \
        (Path(cpp_lowrank.__file__).parent / "lowrank.cpp").read_text()
    argtypes = cpp_lowrank._lib().fxpress_lowrank_ffn.argtypes
    narrower = build.library(f"lowrank_{build_name}", source, {"fxpress_lowrank_ffn": (None, argtypes)})
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 48, generator=g)
    first, second = _factors(48, 11, 100, g), _factors(100, 9, 48, g)
    expected = torch.empty(37, 48)
    cpp_lowrank.lowrank_ffn(x, *first, *second, "silu", None, None, None, expected)
    got = torch.empty(37, 48)
    p = cpp_lowrank.panels
    narrower.fxpress_lowrank_ffn(
        x.data_ptr(), 48, 37, 48, p(first[0]).data_ptr(), 11, p(first[1]).data_ptr(), 100, first[2].data_ptr(),
        p(second[0]).data_ptr(), 9, p(second[1]).data_ptr(), 48, second[2].data_ptr(), None, 0, None, None,
        cpp_lowrank.ACTIVATION_CODES["silu"], got.data_ptr(), 48, 2)
    assert _relative(got, expected) < 1e-6


def _attention_inputs(g, batch, seq, seq_k, heads, kv_heads, d, rank=12):
    ps = [torch.randn(batch, n, rank, generator=g) for n in (seq, seq_k, seq_k)]
    ups = [torch.randn(n * d, rank, generator=g) / rank ** 0.5 for n in (heads, kv_heads, kv_heads)]
    biases = [torch.randn(u.shape[0], generator=g) for u in ups]
    return [t for triple in zip(ps, ups, biases) for t in triple]


def _sdpa(args):
    pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, heads, kv_heads, mask, causal, scale, o_down = args
    q, k, v = [(p @ up.T + b).unflatten(-1, (n, -1)).transpose(1, 2)
               for p, up, b, n in ((pq, q_up, q_bias, heads), (pk, k_up, k_bias, kv_heads), (pv, v_up, v_bias, kv_heads))]
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return context if o_down is None else context.transpose(1, 2).flatten(2) @ o_down.T


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal", "per_head"])
@pytest.mark.parametrize("batch,seq,seq_k,heads,kv_heads,d", [
    (2, 19, 19, 4, 2, 16), (1, 70, 70, 4, 4, 20), (2, 5, 40, 6, 2, 8), (1, 33, 33, 2, 1, 64)])
@pytest.mark.parametrize("o_down", [False, True])
def test_lowrank_attention_matches_sdpa(mask_kind, batch, seq, seq_k, heads, kv_heads, d, o_down):
    g = torch.Generator().manual_seed(seq * heads + d)
    mask_heads = heads if mask_kind == "per_head" else 1
    keep = torch.rand(batch, mask_heads, seq, seq_k, generator=g) > 0.3
    keep[0, 0, seq // 2] = False  # a query that sees no key: 0, as SDPA gives
    mask = {"none": None, "causal": None, "additive": torch.where(keep, 0.0, float("-inf"))}.get(mask_kind, keep)
    factor = torch.randn(10, heads * d, generator=g) / 8 if o_down else None
    args = _attention_inputs(g, batch, seq, seq_k, heads, kv_heads, d) + [
        heads, kv_heads, mask, mask_kind == "causal", 0.3 if mask_kind == "additive" else None, factor]
    expected = _sdpa(args)
    out = torch.empty_strided(expected.shape, expected.stride()) if o_down else \
        torch.empty(batch, seq, heads, d).transpose(1, 2)  # [B, H, S, d] as a view of [B, S, H, d]
    assert cpp_lowrank.lowrank_attention(*args, None, None, False, None, None, 1e-6, out) is out
    assert _relative(out, expected) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_norm", [False, True])
@pytest.mark.parametrize("batch,seq,heads,kv_heads,d,cos_batch", [
    (2, 19, 4, 2, 16, 2), (1, 70, 6, 2, 20, 1), (3, 9, 2, 1, 64, 1)])
def test_lowrank_attention_rotates_as_the_model_does(interleaved, head_norm, batch, seq, heads, kv_heads, d,
                                                     cos_batch):
    g = torch.Generator().manual_seed(seq + d)
    args = _attention_inputs(g, batch, seq, seq, heads, kv_heads, d) + [heads, kv_heads, None, True, None, None]
    cos, sin = rotary.tables(cos_batch, seq, d, interleaved, g)
    norms = (1 + torch.randn(d, generator=g) / 4, 1 + torch.randn(d, generator=g) / 4) if head_norm else (None, None)
    expected = lowrank.lowrank_attention(*args, cos, sin, interleaved, *norms, 1e-5)  # the reference
    q, k = [(p @ up.T + b).unflatten(-1, (n, -1)).transpose(1, 2)
            for p, up, b, n in ((args[0], args[1], args[2], heads), (args[3], args[4], args[5], kv_heads))]
    if head_norm:
        q, k = (F.rms_norm(t, (d,), w, 1e-5) for t, w in zip((q, k), norms))
    q, k = rotary.rotate(q, k, cos, sin, interleaved)
    v = (args[6] @ args[7].T + args[8]).unflatten(-1, (kv_heads, -1)).transpose(1, 2)
    assert _relative(expected, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)) < 1e-5
    out = torch.empty(batch, seq, heads, d).transpose(1, 2)
    cpp_lowrank.lowrank_attention(*args, cos, sin, interleaved, *norms, 1e-5, out)
    assert _relative(out, expected) < 1e-5
