"""The cpp target's lut_linear (fxpress/ops/cpp/lut.cpp) against the exact product of the same
low-bit weights: ragged shapes, every bit width, groups of odd multiples of 32, batches, bias, input
dtypes, both paths; the AVX-512, AVX2, NEON (over scalar intrinsics, tests/native/neon_shim.h)
and portable builds agree to the bit in both weight layouts;
the re-laid-out weights follow in-place updates."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from fxpress import lowbit
from fxpress.native import build
from fxpress.ops.cpp import lut as cpp_lut

pytestmark = pytest.mark.skipif(build.compiler_refusal() is not None, reason="no working C++ compiler")

# The tables are int16 with one scale per 64 columns: about 11 bits of each 4-activation sum.
TABLE_RTOL = 3e-3


def _exact(x, q, bias):
    w = lowbit.dequantize(q.planes, q.alpha, q.beta, q.in_features, q.group_size)
    out = x.double() @ w.double().T
    return out if bias is None else out + bias.double()


def _run(x, q, bias, max_rows):
    out = torch.empty(*x.shape[:-1], q.planes.shape[1], dtype=x.dtype)
    return cpp_lut.lut_linear(x, q.planes, q.alpha, q.beta, bias, q.in_features, q.group_size, max_rows, out)


def _relative(got, expected):
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("method", ["rtn", "bcq"])
@pytest.mark.parametrize("n,k,group", [(37, 200, 64), (64, 96, 32), (5, 256, 128), (100, 515, 256), (40, 384, 96),
                                       (33, 384, 160)])
@pytest.mark.parametrize("rows", [1, 7, 16])
def test_table_path_matches_the_exact_product(bits, method, n, k, group, rows):
    g = torch.Generator().manual_seed(n * k + rows + bits)
    w, bias, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    q = getattr(lowbit, method)(w, bits, group, **({"rounds": 2} if method == "bcq" else {}))
    assert _relative(_run(x, q, bias, 16), _exact(x, q, bias)) < TABLE_RTOL


@pytest.mark.parametrize("rows,max_rows", [(40, 64), (20, 8), (33, 0)])
def test_rows_past_16_and_the_tiled_path(rows, max_rows):
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(70, 130, generator=g), torch.randn(rows, 130, generator=g)
    q = lowbit.rtn(w, 4, 32)
    got, expected = _run(x, q, None, max_rows), _exact(x, q, None)
    if rows > max_rows:  # dequantised tiles and torch.mm: float rounding only
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    else:
        assert _relative(got, expected) < TABLE_RTOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batched_input_of_any_float_dtype(dtype):
    g = torch.Generator().manual_seed(3)
    q = lowbit.rtn(torch.randn(48, 64, generator=g), 4, 32)
    x = torch.randn(2, 3, 64, generator=g).to(dtype)
    got = _run(x, q, None, 16)
    assert got.shape == (2, 3, 48) and got.dtype == dtype
    expected = _exact(x.float().reshape(6, 64), q, None).reshape(2, 3, 48)
    assert _relative(got.float(), expected) < (TABLE_RTOL if dtype == torch.float32 else 1e-2)


def _build(name, prefix):
    import fxpress.ops.cpp as cpp

    source = (Path(cpp.__file__).parent / "lut.cpp").read_text()
    argtypes = cpp_lut._lib().fxpress_lut_gemv.argtypes
    lib = build.library(name, prefix + source, {"fxpress_lut_gemv": (None, argtypes),
                                                 "fxpress_lut_word_pairs": (ctypes.c_int, [])})
    return lib


# Each build, with the portable build of the same weight layout.
BUILDS = {
    "native": ("", "#define FXPRESS_LUT_PORTABLE\n#define FXPRESS_LUT_WORD_PAIRS\n"),
    "avx2": ("#undef __AVX512BW__\n", "#define FXPRESS_LUT_PORTABLE\n"),
    # the NEON path, over scalar definitions of its intrinsics with ARM's semantics
    "neon": ("#undef __AVX512BW__\n#undef __AVX2__\n#define FXPRESS_LUT_NEON_SHIM\n"
             + (Path(__file__).parent / "neon_shim.h").read_text(), "#define FXPRESS_LUT_PORTABLE\n"),
}


@pytest.mark.parametrize("which", list(BUILDS))
@pytest.mark.parametrize("rows,group", [(5, 64), (7, 96), (1, 32)])
def test_vector_and_portable_builds_agree_to_the_bit(which, rows, group):
    vector = _build(f"lut_{which}", BUILDS[which][0])
    pairs = vector.fxpress_lut_word_pairs()
    portable = _build(f"lut_portable_{pairs}", BUILDS[which][1] if pairs else "#define FXPRESS_LUT_PORTABLE\n")
    assert portable.fxpress_lut_word_pairs() == pairs
    g = torch.Generator().manual_seed(5 + rows)
    q = lowbit.rtn(torch.randn(70, 300, generator=g), 3, group)
    x = torch.randn(rows, 300, generator=g)
    packed = cpp_lut.packed(q.planes, q.alpha, q.beta, word_pairs=pairs)
    k_pad = q.planes.shape[-1] * 32
    outs = []
    for lib in (vector, portable):
        out = torch.empty(rows, 70)
        lib.fxpress_lut_gemv(x.data_ptr(), 300, rows, 300, k_pad, packed.indices.data_ptr(), packed.alpha.data_ptr(),
                             packed.beta.data_ptr(), None, 70, 3, group, out.data_ptr(), 70, 1)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    exact = _exact(x, q, None)
    assert _relative(outs[0], exact) < TABLE_RTOL


def test_relaid_weights_follow_in_place_updates():
    g = torch.Generator().manual_seed(7)
    q = lowbit.rtn(torch.randn(40, 64, generator=g), 4, 32)
    x = torch.randn(1, 64, generator=g)
    before = _run(x, q, None, 16)
    q.alpha.mul_(2)  # in place: a new _version, so the kept layout is stale
    after = _run(x, q, None, 16)
    assert _relative(after, _exact(x, q, None)) < TABLE_RTOL
    assert not torch.allclose(before, after)


def test_compiled_quantized_mlp_runs_the_cpp_kernels():
    import fxpress

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.GELU(), torch.nn.Linear(80, 64, bias=False)).eval()
    model = fxpress.compress.quantize(mlp, bits=4, group_size=32, skip=()).model
    for rows in (2, 40):  # the table path, and dequantised tiles + mm
        torch._dynamo.reset()
        x = torch.randn(rows, 96)
        report = fxpress.explain(model, x, target="cpp")
        (graph,) = report.graphs
        lut_kernels = [name for name in graph.generated if name.startswith("op_lut_linear")]
        assert graph.target == "cpp" and len(lut_kernels) == 2 and not graph.not_generated
        with torch.no_grad():
            scale = model(x).abs().max().item()
        assert report.max_abs_diff < TABLE_RTOL * scale
