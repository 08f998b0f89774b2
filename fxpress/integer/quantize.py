"""Float to integer codes: the one step before each integer op (and the last float arithmetic).

``q = clamp(floor(x * (1/scale) + 1/2), -L, L)`` with ``L = 2**(bits-1) - 1`` (127 for int8, the
default; wider codes, int32, only where an option asks, as I-BERT's 22-bit LayerNorm input): a
multiply by a reciprocal computed once,
not a division per element, so the Triton kernel and torch round the same way on every device.
The scale is per tensor (calibrated) or per row, ``max |x| / L`` over the row. For softmax
inputs, masked positions (``-inf``, or below half the dtype's lowest value, as HF masks are) become
code -128, which the integer softmax reads as probability 0, and do not count towards the scale.
"""

from __future__ import annotations

import torch

from fxpress.integer.arith import MASKED


def mask_limit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 2


def masked_positions(x: torch.Tensor) -> torch.Tensor:
    return x <= mask_limit(x.dtype)


def code_limit(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int32


def row_scale(x: torch.Tensor, masked: bool, bits: int = 8) -> torch.Tensor:
    """``max |x| / L`` per row (1 for a row of zeros), float32, shape ``x.shape[:-1] + (1,)``."""
    magnitude = x.abs()
    if masked:
        magnitude = magnitude.masked_fill(masked_positions(x), 0)
    top = magnitude.amax(-1, keepdim=True).to(torch.float32)
    # Times the float32 reciprocal of the limit, as the Triton kernel computes it (no division).
    return torch.where(top > 0, top * torch.tensor(1.0 / code_limit(bits), dtype=torch.float32), torch.ones_like(top))


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    return (1.0 / scale.to(torch.float32)).to(torch.float32)


def quantize(x: torch.Tensor, scale: torch.Tensor, masked: bool, bits: int = 8) -> torch.Tensor:
    """``bits``-bit codes of ``x`` at ``scale`` (broadcast over rows)."""
    t = x.to(torch.float32) * reciprocal(scale)
    q = torch.floor(t + 0.5).clamp(-code_limit(bits), code_limit(bits))
    if masked:
        q = q.masked_fill(masked_positions(x), MASKED)
    return q.to(code_dtype(bits))
