"""Generated Triton kernels (pointwise and row reductions) against eager: under Triton's interpreter on CPU, and on a
GPU when there is one (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxpress


def _run(fn, *args):
    reports = []
    backend = fxpress.Backend(fxpress.Options(target="triton", strict=True), on_report=reports.append)
    with torch.no_grad():
        return torch.compile(fn, backend=backend)(*args), fn(*args), reports[-1]


CASES = {
    "chain": (lambda x, y: F.gelu(x * 2 + y) - torch.tanh(x) * torch.sigmoid(y), [(33, 17), (33, 17)]),
    "broadcast": (lambda x, b: torch.relu(x + b) * torch.rsqrt(x * x + 1.0), [(4, 5, 6), (6,)]),
    "transposed": (lambda x, y: F.silu(x + y.t()), [(7, 129), (129, 7)]),
    "odd_size": (lambda x: torch.where(x > 0, torch.exp(-x), x.pow(2)), [(1031,)]),
    "cast": (lambda x: (x.sin() * x.cos()).to(torch.float16), [(65, 3)]),
    "softmax_with_prologue_epilogue": (lambda x: torch.softmax(x * 2 + 1, -1) * 3, [(6, 37)]),
    "softmax_row_longer_than_a_block": (lambda x: torch.softmax(x, -1), [(3, 2500)]),
    "layer_norm_affine": (lambda x, w, b: F.layer_norm(x + 1, (50,), w, b) * 2, [(4, 7, 50), (50,), (50,)]),
    "layer_norm_plain": (lambda x: F.layer_norm(x, (129,)), [(5, 129)]),
    "sum_keepdim": (lambda x: x.exp().sum(-1, keepdim=True), [(9, 33)]),
    "mean_long_row": (lambda x: (x * x).mean(-1, keepdim=True), [(9, 1100)]),
    "amax": (lambda x: torch.amax(x, -1, keepdim=True), [(5, 13)]),
    # Fused to fxpress::rms_norm by fuse_rms_norm, then its hand-written kernel.
    "rms_norm": (lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)), [(6, 40), (40,)]),
    "rms_norm_long_row": (lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), [(2, 3000)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pointwise_kernels_match_eager(case, device):
    fn, shapes = CASES[case]
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=gen).to(device) for s in shapes]
    actual, expected, report = _run(fn, *args)
    assert report.generated and not report.not_generated, report.not_generated
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, device):
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    actual, expected, report = _run(lambda t: F.gelu(t) * 0.5 + t, x)
    assert actual.dtype == dtype and report.generated
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_tiny_llama_on_triton_target(device):
    from tests.tiny_models import tiny_llama, token_ids

    model, ids = tiny_llama(layers=1).to(device), token_ids(batch=1, length=5).to(device)
    actual, expected, report = _run(model, ids)
    assert any(name.startswith("op_rms_norm") for name in report.generated)
    assert any("not generated yet" in r for r in report.not_generated.values())
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_tiny_bert_layer_norms_are_generated(device):
    from tests.tiny_models import tiny_bert, token_ids

    model, ids = tiny_bert().to(device), token_ids(batch=2, length=6).to(device)
    actual, expected, report = _run(model, ids)
    assert any("native_layer_norm" in name for name in report.generated)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_cpu_tensors_without_interpreter_fall_back_visibly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.warns(fxpress.FallbackWarning, match="TRITON_INTERPRET=1"):
        out = torch.compile(lambda t: t * 2, backend=fxpress.backend(target="triton"))(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_kernel_half_precision(dtype, device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5).to(device, dtype)
    norm.weight.data.copy_(torch.rand(48, generator=torch.Generator().manual_seed(4)) + 0.5)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    actual, expected, report = _run(norm, x)
    assert any(name.startswith("op_rms_norm") for name in report.generated)
    assert actual.dtype == expected.dtype
    # Two roundings to the half type (the normed row, then the weight product), each of which an
    # fp32 last-bit difference between 1/sqrt and torch.rsqrt can flip: allow two ulps.
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2 * ulp, atol=2 * ulp)
