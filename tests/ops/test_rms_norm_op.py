"""fxpress::rms_norm: reference equals HF's LlamaRMSNorm bitwise; fake kernel agrees; errors are clear."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses import FakeTensorMode
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import fxpress.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_llama_rms_norm(dtype):
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 64).to(dtype)
    ours = torch.ops.fxpress.rms_norm(x, norm.weight.data, 1e-5)
    assert ours.dtype == norm(x).dtype and torch.equal(ours, norm(x))


def test_fake_kernel_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(2, 9, 32, dtype=torch.bfloat16)
        w = torch.empty(32, dtype=torch.float32)
        y = torch.ops.fxpress.rms_norm(x, w, 1e-6)
        assert y.shape == (2, 9, 32) and y.dtype == torch.float32
        assert torch.ops.fxpress.rms_norm(x, None, 1e-6).dtype == torch.bfloat16


def test_mismatched_weight_is_refused_by_name():
    with pytest.raises(Exception, match="weight has 16 features, x has 32"):
        with FakeTensorMode():
            torch.ops.fxpress.rms_norm(torch.empty(2, 32), torch.empty(16), 1e-6)


def test_registry_knows_the_op():
    spec = fxpress.ops.OPS["rms_norm"]
    assert spec.op is torch.ops.fxpress.rms_norm.default and spec.qualname == "fxpress::rms_norm"
