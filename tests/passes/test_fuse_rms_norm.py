"""fuse_rms_norm: fires on the Llama-family RMSNorm, bitwise equal; refuses look-alikes."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import fxpress
from fxpress.passes.fuse_rms_norm import fuse_rms_norm
from tests.passes.graphs import capture, run

RULE = "x * rsqrt(mean(x**2, -1) + eps) [* w] => rms_norm(x, w, eps)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_rms_norm_fuses_bitwise(dtype):
    norm = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    norm.weight.data.normal_()
    x = torch.randn(2, 5, 48, dtype=dtype)
    captured = capture(norm, x)
    expected = run(captured, x)
    result = fuse_rms_norm(captured.gm, opts=fxpress.Options())
    assert result.modified and fxpress.counters["fuse_rms_norm"][RULE] == 1
    FileCheck().check("torch.ops.fxpress.rms_norm.default").check_not("rsqrt").run(result.graph_module.code)
    assert torch.equal(run(captured, x)[0], expected[0])


def test_unweighted_form_fuses():
    x = torch.randn(3, 16)
    captured = capture(lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5), x)
    expected = run(captured, x)
    assert fuse_rms_norm(captured.gm, opts=fxpress.Options()).modified
    assert torch.equal(run(captured, x)[0], expected[0])


@pytest.mark.parametrize(
    "fn, reason",
    [
        # Gemma-style: scales by (1 + w), not w. Fuses the normalisation, leaves the (1 + w) scale.
        (lambda t, w: (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1 + w), None),
        # Statistics over the wrong dimension.
        (lambda t, w: t * torch.rsqrt(t.pow(2).mean(0, keepdim=True) + 1e-6) * w, "last dimension"),
        # mean of |x|, not of x**2.
        (lambda t, w: t * torch.rsqrt(t.abs().mean(-1, keepdim=True) + 1e-6) * w, "x**2"),
    ],
    ids=["gemma", "wrong_dim", "abs"],
)
def test_look_alikes_keep_their_semantics(fn, reason):
    x, w = torch.randn(4, 16), torch.randn(16)
    captured = capture(fn, x, w)
    expected = run(captured, x, w)
    fuse_rms_norm(captured.gm, opts=fxpress.Options())
    assert torch.equal(run(captured, x, w)[0], expected[0])
    misses = [k for k in fxpress.counters["fuse_rms_norm"] if "not applied" in k]
    if reason is None:
        assert "(1 + w)" not in captured.gm.code and "add" in captured.gm.code
    else:
        assert fxpress.counters["fuse_rms_norm"][RULE] == 0
        assert any(reason in k for k in misses), misses


def test_fires_once_per_norm_in_a_llama():
    from tests.tiny_models import tiny_llama, token_ids

    report = fxpress.explain(tiny_llama(layers=3), token_ids())
    (record,) = [p for p in report.graphs[0].passes if p.name == "fuse_rms_norm"]
    assert record.counters["fuse_rms_norm"] == {RULE: 3 * 2 + 1}
