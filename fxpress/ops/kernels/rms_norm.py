"""The Triton kernel of ``fxpress::rms_norm``, with the reference's exact semantics: statistics
in fp32, the normalised row cast to the input dtype, then scaled by the weight in the promoted
dtype. One program per row, a loop over blocks of the row when it is longer than one block."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x, weight, out, width, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(x + row * width + cols, mask=cols < width, other=0.0).to(tl.float32)
        acc += v * v
    rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / width + eps)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        v = tl.load(x + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        normed = (v * rstd).to(x.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            normed = normed * tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + row * width + cols, normed.to(out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor) -> torch.Tensor:
    """``fxpress::rms_norm`` into ``out``: one program per row of the contiguous ``x``."""
    width = x.shape[-1]
    rows = x.numel() // max(width, 1)
    block = min(1024, triton.next_power_of_2(max(width, 1)))
    rms_norm_kernel[(rows,)](x, x if weight is None else weight, out, width, float(eps),
                             HAS_WEIGHT=weight is not None, BLOCK=block)
    return out
