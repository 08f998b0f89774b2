"""The low-rank ops against the unfused chains they replace: references (cpu, streamed) and the
Triton kernels (interpreter here, compiled on a GPU when there is one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxpress.ops  # noqa: F401
from fxpress.ops import lowrank as ops_lowrank
from fxpress.ops.kernels import lowrank as kernels
from fxpress.ops.kernels import lowrank_library as library
from tests.conftest import max_diff
from tests.ops import rotary

lowrank = torch.ops.fxpress
TOL = 2e-5


def _factors(n_in, rank, n_out, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
    up = torch.randn(n_out, rank, generator=g) / rank ** 0.5
    return down, up, (torch.randn(n_out, generator=g) if bias else None)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Blocks of 16 rows (queries), so the tests' small inputs stream over several blocks; on a GPU
    the launchers run their Triton kernels, except where a test sends them to the library order."""
    monkeypatch.setattr(ops_lowrank, "BLOCK_ELEMENTS", 256)
    monkeypatch.setattr(kernels, "FUSED_MAX_ROWS", 1 << 62)
    monkeypatch.setattr(library, "CUDA_BLOCK_BYTES", 1024)  # several steps at test sizes


def _chain(x, down, up, bias):
    """The unfused chain, as two nn.Linear calls."""
    return F.linear(F.linear(x, down), up, bias)


def test_lowrank_linear_matches_the_chain_across_streamed_blocks():
    x = torch.randn(3, 20, 40)  # 60 rows: 4 blocks
    down, up, bias = _factors(40, 8, 24)
    assert max_diff(lowrank.lowrank_linear(x, down, up, bias), _chain(x, down, up, bias)) <= TOL
    assert max_diff(lowrank.lowrank_linear(x, down, up, None), _chain(x, down, up, None)) <= TOL


@pytest.mark.parametrize("activation, fn", [
    ("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")), ("silu", F.silu), ("relu", F.relu)])
def test_lowrank_ffn_matches_the_chain(activation, fn):
    x = torch.randn(2, 300, 32)
    first, second = _factors(32, 8, 96, seed=1), _factors(96, 12, 32, seed=2)
    expected = _chain(fn(_chain(x, *first)), *second)
    actual = lowrank.lowrank_ffn(x, *first, *second, activation, None, None, None)
    assert max_diff(actual, expected) <= TOL


def test_gated_lowrank_ffn_matches_swiglu():
    x = torch.randn(2, 7, 32)
    up, gate, down = _factors(32, 8, 64, False, 1), _factors(32, 6, 64, False, 2), _factors(64, 8, 32, False, 3)
    expected = _chain(F.silu(_chain(x, *gate)) * _chain(x, *up), *down)
    assert max_diff(lowrank.lowrank_ffn(x, *up, *down, "silu", *gate), expected) <= TOL


def _attention_inputs(batch=2, seq=19, heads=4, kv_heads=2, head_dim=16, rank=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(batch, seq, rank, generator=g) for _ in range(3)]
    ups = [torch.randn(n * head_dim, rank, generator=g) / rank ** 0.5 for n in (heads, kv_heads, kv_heads)]
    biases = [torch.randn(u.shape[0], generator=g) for u in ups]
    return ps, ups, biases


def _unfused_attention(ps, ups, biases, heads, kv_heads, mask, causal):
    batch, seq = ps[0].shape[:2]
    q, k, v = [(p @ u.T + b).view(batch, seq, n, -1).transpose(1, 2)
               for p, u, b, n in zip(ps, ups, biases, (heads, kv_heads, kv_heads))]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal"])
def test_lowrank_attention_matches_sdpa_with_gqa(mask_kind):
    ps, ups, biases = _attention_inputs()
    keep = torch.rand(2, 1, 19, 19, generator=torch.Generator().manual_seed(3)) > 0.3
    mask = {"none": None, "causal": None, "bool": keep,
            "additive": torch.where(keep, 0.0, float("-inf"))}[mask_kind]
    causal = mask_kind == "causal"
    args = [t for triple in zip(ps, ups, biases) for t in triple]
    actual = lowrank.lowrank_attention(*args, 4, 2, mask, causal, None, None)
    expected = _unfused_attention(ps, ups, biases, 4, 2, mask, causal)
    assert actual.shape == expected.shape and max_diff(actual, expected) <= TOL


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("mask_kind", ["causal", "bool"])
def test_lowrank_attention_rotates_queries_and_keys_as_the_model_does(interleaved, mask_kind):
    ps, ups, biases = _attention_inputs()
    g = torch.Generator().manual_seed(5)
    cos, sin = rotary.tables(2, 19, 16, interleaved, g)
    keep = torch.rand(2, 1, 19, 19, generator=g) > 0.3
    mask = keep if mask_kind == "bool" else None
    q, k, v = [(p @ u.T + b).view(2, 19, n, -1).transpose(1, 2) for p, u, b, n in zip(ps, ups, biases, (4, 2, 2))]
    q, k = rotary.rotate(q, k, cos, sin, interleaved)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    args = [t for triple in zip(ps, ups, biases) for t in triple]
    actual = lowrank.lowrank_attention(*args, 4, 2, mask, mask is None, None, None, cos, sin, interleaved)
    assert max_diff(actual, expected) <= TOL
    unrotated = lowrank.lowrank_attention(*args, 4, 2, mask, mask is None, None, None)
    assert max_diff(unrotated, expected) > 100 * TOL  # the rotation is not a no-op at these positions


def test_lowrank_attention_with_output_factor_returns_the_rank_r_projection():
    ps, ups, biases = _attention_inputs(heads=4, kv_heads=4)
    o_down = torch.randn(10, 64) / 8
    args = [t for triple in zip(ps, ups, biases) for t in triple]
    context = _unfused_attention(ps, ups, biases, 4, 4, None, False)
    expected = context.transpose(1, 2).reshape(2, 19, 64) @ o_down.T
    actual = lowrank.lowrank_attention(*args, 4, 4, None, False, None, o_down)
    assert actual.shape == (2, 19, 10) and max_diff(actual, expected) <= TOL


@pytest.mark.parametrize("make, message", [
    (lambda x, d, u, b: (x, d[:0], u[:, :0], b), "rank 0"),
    (lambda x, d, u, b: (x, d[:, :-1], u, b), "x has 40 features"),
    (lambda x, d, u, b: (x, d, u[:, :-1], b), "but down has rank 8"),
    (lambda x, d, u, b: (x, d.T.contiguous().T, u, b), "down must be contiguous"),
    (lambda x, d, u, b: (x, d, u, b[:-1]), "bias is (23,)"),
    (lambda x, d, u, b: (x, d.double(), u, b), "mixed dtypes"),
])
def test_bad_factors_are_refused_with_the_reason(make, message):
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lowrank.lowrank_linear(*make(x, *_factors(40, 8, 24)))


def test_bad_ffn_and_attention_arguments_are_refused():
    x = torch.randn(2, 32)
    first, second = _factors(32, 8, 96), _factors(96, 12, 32)
    with pytest.raises(ValueError, match="activation 'tanh' is not one of"):
        lowrank.lowrank_ffn(x, *first, *second, "tanh", None, None, None)
    with pytest.raises(ValueError, match="second projection.*x has 96 features"):
        lowrank.lowrank_ffn(x, *first, *_factors(95, 12, 32), "gelu", None, None, None)
    ps, ups, biases = _attention_inputs()
    args = [t for triple in zip(ps, ups, biases) for t in triple]
    with pytest.raises(ValueError, match="positive multiple of num_kv_heads"):
        lowrank.lowrank_attention(*args, 4, 3, None, False, None, None)
    cos, sin = rotary.tables(2, 19, 16, False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="give both cos and sin"):
        lowrank.lowrank_attention(*args, 4, 2, None, False, None, None, cos, None)
    with pytest.raises(ValueError, match=r"cos must be \[batch\|1, seq, head_dim\] = \[2\|1, 19, 16\], got \(2, 19, 8\)"):
        lowrank.lowrank_attention(*args, 4, 2, None, False, None, None, cos[..., :8], sin[..., :8])


# Triton kernels ---------------------------------------------------------------------------------



def _on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def test_triton_lowrank_linear(device):
    lowrank_linear = kernels.lowrank_linear
    x, down, up, bias = _on(device, torch.randn(2, 37, 40), *_factors(40, 20, 72))
    out = torch.empty(2, 37, 72, device=device)
    lowrank_linear(x, down, up, bias, out)
    assert max_diff(out.cpu(), lowrank.lowrank_linear(*[t.cpu() for t in (x, down, up, bias)])) <= TOL


@pytest.mark.parametrize("activation, gated", [("gelu", False), ("gelu_tanh", False), ("relu", False), ("silu", True)])
def test_triton_lowrank_ffn(device, activation, gated):
    lowrank_ffn = kernels.lowrank_ffn
    x = torch.randn(33, 32)
    first, second = _factors(32, 8, 80, seed=1), _factors(80, 12, 48, seed=2)
    gate = _factors(32, 6, 80, seed=3) if gated else (None, None, None)
    args = (x, *first, *second, activation, *gate)
    out = torch.empty(33, 48, device=device)
    lowrank_ffn(*_on(device, *args), out)
    assert max_diff(out.cpu(), lowrank.lowrank_ffn(*args)) <= TOL


@pytest.mark.parametrize("mask_kind, o_down, rotation, head_norm, passes", [
    ("bool", False, None, False, 1), ("causal", False, None, False, 2), ("additive", True, None, False, 2),
    ("causal", False, "half", False, 1), ("bool", True, "pairs", False, 1), ("causal", True, "half", True, 2)])
def test_triton_lowrank_attention(device, mask_kind, o_down, rotation, head_norm, passes, monkeypatch):
    if passes == 2:  # room for one KV head's K and V per pass: the second pass adds to the first's output
        monkeypatch.setattr(kernels, "KV_SCRATCH_BYTES", 1)
    args = _kernel_attention_args(mask_kind, o_down, rotation, head_norm)
    expected = lowrank.lowrank_attention(*args)
    out = torch.empty_strided(expected.shape, expected.stride(), device=device)
    kernels.lowrank_attention(*_on(device, *args), out)
    assert max_diff(out.cpu(), expected) <= TOL


# The GPU's order (whole sequences, all heads at once) -------------------------------------------

def _kernel_attention_args(mask_kind, o_down, rotation, head_norm):
    """lowrank_attention's arguments at 2 x 37 tokens, 4 query and 2 KV heads of 16."""
    ps, ups, biases = _attention_inputs(seq=37)
    keep = torch.rand(2, 1, 37, 37, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[0, 0, 5] = False  # a query that sees no key: 0, as SDPA gives
    mask = {"bool": keep, "causal+bool": keep, "additive": torch.where(keep, 0.0, float("-inf")),
            "causal": None, "none": None}[mask_kind]
    factor = torch.randn(10, 64) / 8 if o_down else None
    cos, sin = (None, None) if rotation is None else rotary.tables(
        2, 37, 16, rotation == "pairs", torch.Generator().manual_seed(4))
    args = ([t for triple in zip(ps, ups, biases) for t in triple]
            + [4, 2, mask, mask_kind.startswith("causal"), None, factor, cos, sin, rotation == "pairs"])
    g = torch.Generator().manual_seed(6)  # Gemma 3's q_norm and k_norm before the rotation
    args += [1 + torch.randn(16, generator=g) / 4, 1 + torch.randn(16, generator=g) / 4] if head_norm else [None, None]
    args.append(1e-6)
    return args


@pytest.mark.parametrize("mask_kind, o_down, rotation, head_norm", [
    ("none", False, None, False), ("bool", True, None, False), ("additive", False, None, False),
    ("causal", True, "half", True), ("causal+bool", False, "pairs", False)])
def test_library_attention_matches_the_per_head_reference(mask_kind, o_down, rotation, head_norm, monkeypatch):
    """What a GPU runs, here on CPU tensors: one sequence per step, then both in one step."""
    args = _kernel_attention_args(mask_kind, o_down, rotation, head_norm)
    expected = lowrank.lowrank_attention(*args)
    for block_bytes in (1024, 1 << 30):
        monkeypatch.setattr(library, "CUDA_BLOCK_BYTES", block_bytes)
        out = torch.full_like(expected, float("nan"))
        library.attention(*args, out)
        assert max_diff(out, expected) <= TOL


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, TOL), (torch.bfloat16, 0.02)])
@pytest.mark.parametrize("gated", [False, True])
def test_library_ffn_and_linear_match_the_chain(dtype, tolerance, gated):
    """The FFN over blocks of 16 rows (CUDA_BLOCK_BYTES holds fewer), a ragged last one."""
    x = torch.randn(37, 32)
    first, second = _factors(32, 8, 200, seed=1), _factors(200, 12, 48, seed=2)
    gate = _factors(32, 6, 200, seed=3) if gated else (None, None, None)
    args = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, *first, *second, "silu", *gate)]
    out = torch.empty(37, 48, dtype=dtype)
    library.ffn(*args, out)
    expected = lowrank.lowrank_ffn(*[t.double() if isinstance(t, torch.Tensor) else t for t in args])
    assert max_diff(out.double(), expected) <= tolerance * expected.abs().max()
    out = torch.empty(37, 200)
    library.linear(x, *first, out)
    assert max_diff(out, lowrank.lowrank_linear(x, *first)) <= TOL


@pytest.mark.gpu
def test_cuda_launches_run_the_library_order(monkeypatch):
    """By default every CUDA launch takes the library order; the same answers as the references."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(kernels, "FUSED_MAX_ROWS", 0)
    for mask_kind, o_down, rotation, head_norm in [("bool", True, None, False), ("causal", False, "half", True),
                                                   ("causal+bool", True, "pairs", False)]:
        args = _kernel_attention_args(mask_kind, o_down, rotation, head_norm)
        expected = lowrank.lowrank_attention(*args)
        out = torch.empty_strided(expected.shape, expected.stride(), device="cuda")
        kernels.lowrank_attention(*_on("cuda", *args), out)
        assert max_diff(out.cpu(), expected) <= TOL, mask_kind
    x = torch.randn(3, 70, 32)
    first, second, gate = _factors(32, 8, 80, seed=1), _factors(80, 12, 48, seed=2), _factors(32, 6, 80, seed=3)
    for args in [(x, *first, *second, "gelu", None, None, None), (x, *first, *second, "silu", *gate)]:
        out = torch.empty(3, 70, 48, device="cuda")
        kernels.lowrank_ffn(*_on("cuda", *args), out)
        assert max_diff(out.cpu(), lowrank.lowrank_ffn(*args)) <= TOL
    out = torch.empty(3, 70, 80, device="cuda")
    kernels.lowrank_linear(*_on("cuda", x, *first), out)
    assert max_diff(out.cpu(), lowrank.lowrank_linear(x, *first)) <= TOL
