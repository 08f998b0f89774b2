"""``fxpress::rms_norm``: root-mean-square normalisation as one op.

Semantics are those of the Llama family's RMSNorm (HF ``LlamaRMSNorm``): statistics in fp32, the
normalised value cast back to the input's dtype, then scaled by ``weight``::

    y = weight * (x32 * rsqrt(mean(x32 ** 2, -1) + eps)).to(x.dtype)

The reference below performs exactly those ATen ops in that order, so a graph rewritten to use it
is bitwise equal to the unfused one.
"""

from __future__ import annotations

import torch

from fxpress.core.triton_types import TL_DTYPES
from fxpress.ops._define import define_op
from fxpress.ops.lowering import Launcher, contiguous


def _reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def _fake(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if weight is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"fxpress::rms_norm: weight has {weight.shape[-1]} features, x has {x.shape[-1]}"
        )
    shape = torch.broadcast_shapes(x.shape, weight.shape)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(shape, dtype=dtype)


def _triton_refusal(node: torch.fx.Node) -> str | None:
    x, weight, _ = node.args
    if not (contiguous(x.meta["val"]) and contiguous(node.meta["val"])) or x.meta["val"].dtype not in TL_DTYPES:
        return "rms_norm of a non-contiguous or symbolic-shaped input"
    if weight is not None and not (contiguous(weight.meta["val"]) and weight.meta["val"].dim() == 1):
        return "rms_norm with a weight that is not one contiguous row"
    return None


rms_norm = define_op("rms_norm", _reference, _fake, overwritable=0, lowerings={
    "triton": Launcher("fxpress.ops.kernels.rms_norm", "rms_norm", _triton_refusal)})
