"""The KIVI quantiser: torch reference and Triton kernels against an independent NumPy reference,
code for code; and the decode kernel against the reference attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxpress.kv import KIVI, quant
from fxpress.kv.attention import PLAIN, reference_attend
from fxpress.kv.kivi import KIVIStore


def numpy_quantize(x: np.ndarray, bits: int, axis: int, dtype=np.float16):
    """Asymmetric min-max over ``axis``; scale and min rounded to ``dtype`` first, round half to even."""
    x = x.astype(np.float32)
    lo = x.min(axis, keepdims=True).astype(dtype)
    hi = x.max(axis, keepdims=True)
    scale = ((hi - lo.astype(np.float32)) / np.float32(2**bits - 1)).astype(dtype)
    s, m = scale.astype(np.float32), lo.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, (x - m) / np.where(s > 0, s, 1), 0).astype(np.float32)
    return np.clip(np.round(q), 0, 2**bits - 1).astype(np.int64), scale, lo


def numpy_pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    per = 32 // bits
    codes = np.moveaxis(codes, axis, -1)
    split = codes.reshape(*codes.shape[:-1], -1, per)
    words = (split << (np.arange(per) * bits)).sum(-1) & 0xFFFFFFFF
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def numpy_clipped(x: np.ndarray, bits: int, axis: int, ratios=(1.0, 0.9, 0.8, 0.7, 0.6)):
    """Of the min-max range shrunk about its middle by each ratio, the least squared error; ties
    keep the earlier (wider) range."""
    x = x.astype(np.float32)
    lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    mid, half = (lo + hi) / np.float32(2), (hi - lo) / np.float32(2)
    best = None
    for r in ratios:
        r = np.float32(r)
        low = (mid - r * half).astype(np.float16)
        scale = ((mid + r * half - low.astype(np.float32)) / np.float32(2**bits - 1)).astype(np.float16)
        s, m = scale.astype(np.float32), low.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, (x - m) / np.where(s > 0, s, 1), 0).astype(np.float32)
        codes = np.clip(np.round(q), 0, 2**bits - 1)
        err = ((codes.astype(np.float32) * s + m - x) ** 2).sum(axis, keepdims=True)
        if best is None:
            best = [codes, scale, low, err]
            continue
        better = err < best[3]
        best = [np.where(better, new, old) for new, old in zip((codes, scale, low, err), best)]
    return best[0].astype(np.int64), best[1], best[2]


def numpy_kivi(k: np.ndarray, v: np.ndarray, bits: int, g: int, clip: bool = False) -> dict[str, np.ndarray]:
    b, h, n, d = k.shape
    quantize_keys = numpy_clipped if clip else numpy_quantize
    kc, ks, kl = quantize_keys(k.reshape(b, h, n // g, g, d), bits, 3)
    vc, vs, vl = numpy_quantize(v.reshape(b, h, n, d // g, g), bits, 4)
    return {"k_codes": numpy_pack(kc.reshape(b, h, n, d), bits, 2), "k_scale": ks[:, :, :, 0], "k_lo": kl[:, :, :, 0],
            "v_codes": numpy_pack(vc.reshape(b, h, n, d), bits, 3), "v_scale": vs[..., 0], "v_lo": vl[..., 0]}


def _kv(n=64, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 3, n, d, generator=g) * 3
    v = torch.randn(2, 3, n, d, generator=g)
    k[0, 0, :, 5] = 0.25  # a constant channel: scale 0, code 0, exact
    v[1, 2, 7] = torch.linspace(0, 3, d)  # evenly spaced: lands on rounding ties
    return k, v


def _store(bits, g=32, max_len=128, residual=32, sink=0, device="cpu", clip=False, rope_theta=None):
    return KIVIStore(KIVI(bits=bits, group_size=g, residual=residual, sink=sink, clip_keys=clip, rope_theta=rope_theta),
                     max_len, batch=2, heads=3, head_dim=64, dtype=torch.float16, device=torch.device(device))


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_torch_quantiser_matches_numpy_code_for_code(bits, clip):
    k, v = _kv()
    ours = _store(bits, clip=clip).quantize_block(k, v)
    ref = numpy_kivi(k.numpy(), v.numpy(), bits, 32, clip=clip)
    for name, expected in ref.items():
        np.testing.assert_array_equal(ours[name].numpy(), expected, err_msg=name)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_quantiser_matches_numpy_code_for_code(bits, clip, device):
    from fxpress.kv.kernels import kivi

    k, v = _kv(n=32)
    got = {**kivi.quantize_keys(k.to(device), bits, 32, torch.float16, clip=clip),
           **kivi.quantize_values(v.to(device), bits, 32, torch.float16)}
    for name, expected in numpy_kivi(k.numpy(), v.numpy(), bits, 32, clip=clip).items():
        np.testing.assert_array_equal(got[name].cpu().numpy(), expected, err_msg=name)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_round_trip_and_dequantisation_error(bits):
    codes = torch.randint(0, 2**bits, (3, 64, 5), dtype=torch.int32)
    assert torch.equal(quant.unpack(quant.pack(codes, bits, 1), bits, 1), codes)
    x = torch.randn(4, 32, 16)
    c, scale, lo = quant.quantize(x, bits, 1, torch.float32)
    error = (quant.dequantize(c, scale, lo) - x).abs()
    assert (error <= scale / 2 + 1e-6).all()  # round to nearest: at most half a step


def _filled_store(bits, sink, device, rope_theta=None):
    store = _store(bits, sink=sink, max_len=256, device=device, rope_theta=rope_theta)
    k, v = _kv(n=107)
    store.append(k[:, :, :100].to(device), v[:, :, :100].to(device), 0)
    store.append(k[:, :, 100:].to(device), v[:, :, 100:].to(device), 100)
    return store


@pytest.mark.parametrize("bits,sink,split,rope_theta", [(2, 0, 1024, None), (4, 3, 32, None), (2, 3, 32, 1e4)])
def test_decode_kernel_matches_reference_attention(bits, sink, split, rope_theta, device):
    """The Triton decode kernel; with ``rope_theta`` over pre-RoPE keys, turned as it reads them."""
    from fxpress.kv.kernels import kivi

    g = torch.Generator().manual_seed(3)
    q, kn, vn = (torch.randn(*s, generator=g) for s in ((2, 9, 1, 64), (2, 3, 1, 64), (2, 3, 1, 64)))
    reference = _filled_store(bits, sink, "cpu", rope_theta)
    assert reference.quantised > 0 and reference.waiting > 0 and reference.sunk == sink
    expected, _ = reference_attend(reference, q, kn, vn, 0.125)  # dequantise segment by segment, in torch
    got = kivi.decode_attention(q.to(device), _filled_store(bits, sink, device, rope_theta), kn.to(device),
                                vn.to(device), 0.125, tokens_per_split=split)
    assert (got.cpu() - expected).abs().max() <= 2e-5


@pytest.mark.parametrize("bits,ratio,gq", [(2, 0.4, 3), (4, 0.75, 1)])
def test_decode_kernel_matches_reference_attention_over_think_pruned_keys(bits, ratio, gq, device):
    """The Triton kernel with ThinK-pruned quantised keys (kept channels not a power of two)."""
    from fxpress.kv.kernels import kivi
    from fxpress.kv.think import ThinKV

    g = torch.Generator().manual_seed(5)
    think = ThinKV(ratio=ratio, window=8, kivi=KIVI(bits=bits, group_size=32, residual=32, sink=2))
    stores = [KIVIStore(think.kivi, 128, prune=think, batch=2, heads=3, head_dim=64, dtype=torch.float16,
                        device=torch.device(where)) for where in ("cpu", device)]
    k, v, queries = _kv(n=107) + (torch.randn(2, 3 * gq, 107, 64, generator=g),)
    for store in stores:
        store.observe_queries(queries.to(store.device))
        store.append(k.to(store.device), v.to(store.device), 0)
    assert stores[0].quantised > 0 and stores[0].k_codes.shape[-1] == think.kept_channels(64)
    q, kn, vn = (torch.randn(*s, generator=g) for s in ((2, 3 * gq, 1, 64), (2, 3, 1, 64), (2, 3, 1, 64)))
    expected, _ = reference_attend(stores[0], q, kn, vn, 0.125)
    got = kivi.decode_attention(q.to(device), stores[1], kn.to(device), vn.to(device), 0.125, tokens_per_split=32)
    assert (got.cpu() - expected).abs().max() <= 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group,d,gq,sink,split,filled,rope_theta", [
    (2, 32, 64, 3, 0, 1024, 107, None), (4, 32, 64, 3, 3, 32, 300, None), (2, 64, 64, 3, 4, 128, 517, None),
    (2, 48, 96, 3, 1, 96, 250, None), (4, 32, 32, 3, 0, 64, 20, None), (8, 32, 128, 4, 2, 256, 700, None),
    (2, 32, 128, 1, 0, 512, 333, None), (4, 16, 48, 2, 1, 32, 90, None),
    (2, 32, 64, 3, 4, 64, 300, 1e5), (4, 16, 48, 2, 1, 32, 90, 1e4)])
def test_cpp_decode_kernel_matches_reference_attention(dtype, bits, group, d, gq, sink, split, filled, rope_theta):
    """The C++ decode kernel (batch 2, ``gq`` query heads per KV head: pairs and a single head
    left) against the reference attention over the same store: every code width, constant and
    run-time group sizes and head dims (multiples of 32 or not), every storage dtype, sink and ragged
    residual windows, with and without quantised tokens, keys stored as they came or pre-RoPE."""
    from fxpress.kv.kernels import kivi_cpu
    from fxpress.native import build

    if build.compiler_refusal() is not None:
        pytest.skip("no working C++ compiler")
    g = torch.Generator().manual_seed(filled)
    store = KIVIStore(KIVI(bits=bits, group_size=group, residual=32, sink=sink, rope_theta=rope_theta), filled + 1,
                      batch=2, heads=2, head_dim=d, dtype=dtype, device=torch.device("cpu"))
    k, v = torch.randn(2, 2, filled, d, generator=g), torch.randn(2, 2, filled, d, generator=g)
    store.append(k[:, :, :filled // 2].to(dtype), v[:, :, :filled // 2].to(dtype), 0)
    store.append(k[:, :, filled // 2:].to(dtype), v[:, :, filled // 2:].to(dtype), filled // 2)
    q, kn, vn = (torch.randn(*shape, generator=g).to(dtype) for shape in ((2, 2 * gq, 1, d), (2, 2, 1, d), (2, 2, 1, d)))
    expected, _ = reference_attend(store, q, kn, vn, d ** -0.5, PLAIN)
    got = kivi_cpu.decode_attention(q, store, kn, vn, d ** -0.5, tokens_per_split=split)
    assert (got - expected).abs().max() <= 2e-5
    assert store.attend(q, kn, vn, d ** -0.5, PLAIN)[0].equal(
        kivi_cpu.decode_attention(q, store, kn, vn, d ** -0.5))  # what the store runs on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group,d,gq,ratio,filled", [
    (2, 32, 64, 3, 0.4, 300), (4, 32, 128, 2, 0.5, 200), (8, 16, 48, 1, 0.25, 90), (2, 32, 64, 2, 0.75, 77)])
def test_cpp_decode_kernel_matches_reference_attention_over_think_pruned_keys(dtype, bits, group, d, gq, ratio,
                                                                              filled):
    """KIVI with ThinK-pruned keys (``ThinKV(kivi=...)``): the C++ kernel meets the quantised keys'
    kept channels with the query's, run-time widths, against the reference (dropped channels zero)."""
    from fxpress.kv.kernels import kivi_cpu
    from fxpress.kv.think import ThinKV
    from fxpress.native import build

    if build.compiler_refusal() is not None:
        pytest.skip("no working C++ compiler")
    g = torch.Generator().manual_seed(filled)
    think = ThinKV(ratio=ratio, window=8, kivi=KIVI(bits=bits, group_size=group, residual=32, sink=2))
    store = KIVIStore(think.kivi, filled + 1, prune=think, batch=2, heads=2, head_dim=d, dtype=dtype,
                      device=torch.device("cpu"))
    k, v = torch.randn(2, 2, filled, d, generator=g), torch.randn(2, 2, filled, d, generator=g)
    store.observe_queries(torch.randn(2, 2 * gq, filled, d, generator=g))
    store.append(k.to(dtype), v.to(dtype), 0)
    assert store.quantised and store.k_codes.shape[-1] == think.kept_channels(d) < d
    q, kn, vn = (torch.randn(*shape, generator=g).to(dtype) for shape in ((2, 2 * gq, 1, d), (2, 2, 1, d), (2, 2, 1, d)))
    expected, _ = reference_attend(store, q, kn, vn, d ** -0.5, PLAIN)
    got = kivi_cpu.decode_attention(q, store, kn, vn, d ** -0.5, tokens_per_split=64)
    assert (got - expected).abs().max() <= 2e-5
    assert store.attend(q, kn, vn, d ** -0.5, PLAIN)[0].equal(kivi_cpu.decode_attention(q, store, kn, vn, d ** -0.5))
