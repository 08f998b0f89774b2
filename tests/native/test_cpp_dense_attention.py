"""The cpp target's attention kernel (fxpress/ops/cpp/dense_attention.cpp) against ATen's CPU SDPA:
GQA, batches, query and key counts off the kernel's blocks (one query; fewer queries than keys;
a causal chunk boundary), head dims off its 16-column panels, a value dim unlike the key's, every
mask kind (none, padding, per head, boolean, fully masked rows), q/k/v read through the strides of
a projection's output or with a non-unit channel stride, and strided outputs. Then SDPA in a
compiled graph: run by the kernel, matching eager, or left to ATen with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxpress
from fxpress.native import build
from fxpress.ops.cpp import dense_attention as launcher
from fxpress.ops.cpp.dense_attention import dense_attention
from tests.conftest import max_diff

pytestmark = pytest.mark.skipif(build.compiler_refusal() is not None, reason="no working C++ compiler")

SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's output [b, t, heads * d] seen as [b, heads, t, d] (strided, as models make it)."""
    b, t, width = x.shape
    return x.view(b, t, heads, width // heads).transpose(1, 2)


def _expected(q, k, v, mask, causal, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if mask is not None and mask.dtype == torch.bool:  # ATen's CPU kernel takes float masks only
        mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    return SDPA(q, k, v, is_causal=causal, attn_mask=mask, scale=scale)[0]


def _mask(kind: str, b: int, h: int, t: int, s: int, g: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "padding":  # the tail of every other sequence hidden, broadcast over heads and queries
        keep = torch.ones(b, s, dtype=torch.bool)
        keep[::2, s // 2 + 1:] = False
        return torch.where(keep, 0.0, float("-inf"))[:, None, None, :].expand(b, 1, t, s)
    if kind == "per_head":
        return torch.randn(b, h, t, s, generator=g)
    if kind == "bool":
        return torch.rand(t, s, generator=g) > 0.3
    if kind == "fully_masked_rows":  # rows that see no key: SDPA on the CPU gives 0 there
        mask = torch.zeros(b, 1, t, s)
        mask[:, :, ::3] = float("-inf")
        return mask
    raise ValueError(kind)


@pytest.mark.parametrize("batch,heads,kv_heads", [(1, 4, 4), (3, 6, 2)])
@pytest.mark.parametrize("seq,seq_k", [(1, 1), (5, 37), (50, 50), (130, 70), (100, 100)])
@pytest.mark.parametrize("d", [8, 33, 64])
@pytest.mark.parametrize("mask", ["none", "padding", "per_head", "bool", "fully_masked_rows"])
def test_matches_sdpa(batch, heads, kv_heads, seq, seq_k, d, mask):
    g = torch.Generator().manual_seed(batch * 1000 + seq * 10 + d)
    q = _heads(torch.randn(batch, seq, heads * d, generator=g), heads)
    k = _heads(torch.randn(batch, seq_k, kv_heads * d, generator=g), kv_heads)
    v = _heads(torch.randn(batch, seq_k, kv_heads * d, generator=g), kv_heads)
    m = _mask(mask, batch, heads, seq, seq_k, g)
    out = torch.empty(batch, seq, heads, d).transpose(1, 2)  # the layout ATen's kernel returns
    assert dense_attention(q, k, v, m, False, None, out) is out
    assert max_diff(out, _expected(q, k, v, m, False, None)) < 2e-5


@pytest.mark.parametrize("seq,seq_k", [(1, 1), (7, 7), (100, 100), (200, 200), (40, 90), (90, 40)])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (9, 3)])
def test_causal_matches_sdpa(seq, seq_k, heads, kv_heads):
    g = torch.Generator().manual_seed(seq + seq_k)
    q = torch.randn(1, heads, seq, 64, generator=g)
    k, v = (torch.randn(1, kv_heads, seq_k, 64, generator=g) for _ in range(2))
    out = torch.empty_like(q)
    dense_attention(q, k, v, None, True, 0.3, out)
    assert max_diff(out, _expected(q, k, v, None, True, 0.3)) < 2e-5


def test_value_dim_and_strides_unlike_the_keys():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 40, 24, generator=g).transpose(2, 3).contiguous().transpose(2, 3)  # channel stride 40
    k = torch.randn(2, 3, 24, 30, generator=g).transpose(2, 3)  # [2, 3, 30, 24], channel stride 30
    v = torch.randn(2, 30, 3, 20, generator=g).permute(0, 2, 1, 3)  # value dim 20
    out = torch.empty(2, 3, 20, 40).transpose(2, 3)  # channel stride 40
    mask = torch.randn(2, 1, 40, 30, generator=g)
    dense_attention(q, k, v, mask, False, None, out)
    expected = torch.softmax(q @ k.transpose(2, 3) / 24 ** 0.5 + mask, -1) @ v  # ATen's kernel wants dv == d
    assert max_diff(out, expected) < 2e-5


@pytest.mark.parametrize("build_name,prefix", [("portable", "#undef __AVX512F__\n#undef __AVX2__\n"),
                                               ("avx2", "#undef __AVX512F__\n")])
def test_narrower_builds_agree_with_sdpa(build_name, prefix, monkeypatch):
    """The AVX2 and portable paths (panel layout, products, softmax) on the cases with most branches:
    a padding mask, a per-head mask, causal, a ragged head dim, query chunks, strided operands."""
    native = Path(build.__file__).parent
    source = prefix + "".join((native / h).read_text() for h in launcher.ATTENTION_HEADERS) + \
        (Path(launcher.__file__).parent / "dense_attention.cpp").read_text()
    narrower = build.library(f"dense_attention_{build_name}", source,
                             {"fxpress_dense_attention": (None, launcher._lib().fxpress_dense_attention.argtypes)})
    monkeypatch.setattr(launcher, "_lib", lambda: narrower)
    g = torch.Generator().manual_seed(11)
    for mask_kind, causal, seq, d in (("padding", False, 130, 33), ("per_head", False, 50, 16), ("none", True, 70, 20)):
        q = _heads(torch.randn(2, seq, 6 * d, generator=g), 6)
        k, v = (_heads(torch.randn(2, seq, 2 * d, generator=g), 2) for _ in range(2))
        m = _mask(mask_kind, 2, 6, seq, seq, g)
        out = torch.empty(2, seq, 6, d).transpose(1, 2)
        dense_attention(q, k, v, m, causal, None, out)
        assert max_diff(out, _expected(q, k, v, m, causal, None)) < 2e-5, (build_name, mask_kind)


def _compiled(fn, *args):
    reports = []
    backend = fxpress.Backend(fxpress.Options(target="cpp", strict=True), on_report=reports.append)
    with torch.no_grad():
        return torch.compile(fn, backend=backend)(*args), fn(*args), reports[-1]


def test_sdpa_in_a_compiled_graph_runs_the_kernel():
    def attend(x, w, mask):
        q, k, v = (_heads(t, 4) for t in (x @ w).chunk(3, -1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 37, 64, generator=g), torch.randn(64, 192, generator=g) / 8
    mask = _mask("padding", 3, 4, 37, 37, g)
    actual, expected, report = _compiled(attend, x, w, mask)
    assert "dense_attention(" in report.wrapper
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5)


def test_sdpa_it_cannot_run_stays_atens_and_says_why():
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    actual, expected, report = _compiled(attend, q, k, v)
    assert "dense_attention(" not in report.wrapper
    assert any("float32" in r for r in report.not_generated.values()), report.not_generated
    torch.testing.assert_close(actual, expected)
