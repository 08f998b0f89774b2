"""The integer-only algorithms in torch: the reference implementations of the ``fxpress::int_*`` ops.

Codes are held in int64 here so torch never wraps; every intermediate provably fits int32 (the
bounds are in ``constants.py`` and the NumPy reference in the tests asserts them), which is the
arithmetic the Triton kernels do. Shifts are arithmetic (floor) and divisions floor, as in the papers'
``floor_ste``; every division has a non-negative numerator and a positive denominator.

Conventions: ``q`` is int8 codes (``x ~ q * scale``), ``scale`` holds one float per row (shape
``q.shape[:-1] + (1,)``) or one for the whole tensor (one element). Code -128 is produced only by
the softmax quantiser, for masked positions (``-inf`` or below half the dtype's lowest value).
"""

from __future__ import annotations

import torch

from fxpress.core.errors import IntegerError
from fxpress.integer.constants import (GELU_COLUMNS, SIGMOID_BITS, SOFTMAX_COLUMNS, gelu_constants,
                                       softmax_constants)

MASKED = -128
INT32_MAX = 2 ** 31 - 1
NEWTON_STEPS = 20  # from 2**16, enough for floor(sqrt(v)) exactly for every v < 2**31


def _columns(table: torch.Tensor, names: tuple[str, ...], rows: int) -> dict[str, torch.Tensor]:
    table = table.to(torch.int64).expand(rows, -1) if table.shape[0] == 1 else table.to(torch.int64)
    return {name: table[:, i:i + 1] for i, name in enumerate(names)}


def _shift(value: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """value * 2**amount, floored; right shifts saturate at 31 (value < 2**31 becomes 0 or -1)."""
    return torch.where(amount >= 0, value << amount.clamp(min=0), value >> (-amount).clamp(max=31))


def shift_exp(d: torch.Tensor, k: dict[str, torch.Tensor], poly: bool) -> torch.Tensor:
    """exp(d) for codes ``d <= 0`` at the row's scale, times ``2**norm`` scaled to ``exp_bits``.

    I-BERT (``poly``): d = x0 q + r with x0 = -ln 2, exp(r) by the polynomial, then >> q.
    I-ViT: d * log2(e) ~ d + d/2 - d/16, then d = x0 q + r with x0 = -1, 2**r ~ r/2 + 1, >> q.
    """
    d = _shift(d, -k["pre"])
    if not poly:
        d = d + (d >> 1) - (d >> 4)
    d = torch.maximum(d, k["low"])
    q = (-d) // (-k["x0"])
    r = d - k["x0"] * q
    z = (r + k["b"]) * r + k["c"] if poly else r - 2 * k["x0"]
    return _shift(z, k["norm"] - q)


def _rows(q: torch.Tensor, where: str) -> torch.Tensor:
    if q.dtype != torch.int8:
        raise IntegerError(f"{where}: expects int8 codes, got {q.dtype}")
    return q.reshape(-1, q.shape[-1]).to(torch.int64)


def softmax_int(q: torch.Tensor, scale: torch.Tensor, method: str, max_q: int, exp_bits: int,
                out_bits: int) -> torch.Tensor:
    """Softmax over the last dim: probabilities as codes at scale ``2**-out_bits`` (uint8 up to 8
    bits, int16 above). Masked codes get 0; a row with every position masked is uniform, as
    eager softmax of equal values is."""
    rows = _rows(q, "integer softmax")
    check_row_length(rows.shape[-1], exp_bits)
    k = _columns(softmax_constants(scale, method, exp_bits, max_q), SOFTMAX_COLUMNS, rows.shape[0])
    top = rows.amax(-1, keepdim=True)
    masked = (rows == MASKED) & (top != MASKED)
    e = torch.where(masked, 0, shift_exp(rows - top, k, poly=method == "ibert"))
    return normalise(e, out_bits).reshape(q.shape).to(softmax_dtype(out_bits))


def normalise(e: torch.Tensor, out_bits: int) -> torch.Tensor:
    """round(e / sum(e) * 2**out_bits) through one int32 reciprocal per row (I-ViT's (2**31-1)/sum),
    clamped to ``2**out_bits - 1``."""
    shift = 31 - out_bits
    half = 1 << (shift - 1)
    factor = (INT32_MAX - half) // e.sum(-1, keepdim=True)
    return ((e * factor + half) >> shift).clamp(max=(1 << out_bits) - 1)


def softmax_dtype(out_bits: int) -> torch.dtype:
    return torch.uint8 if out_bits <= 8 else torch.int16


def check_row_length(length: int, exp_bits: int) -> None:
    if length >= 2 ** (31 - exp_bits):
        raise IntegerError(f"integer softmax: a row of {length} exp values below 2**{exp_bits} overflows the int32 "
                           f"sum; rows must be shorter than {2 ** (31 - exp_bits)} (lower softmax_exp_bits)")


def gelu_int(q: torch.Tensor, scale: torch.Tensor, method: str, max_q: int, exp_bits: int) -> torch.Tensor:
    """GELU as int32 codes at ``gelu_output_scale(scale, method)``."""
    rows = _rows(q, "integer GELU")
    k = _columns(gelu_constants(scale, method, exp_bits, max_q), GELU_COLUMNS[method], rows.shape[0])
    if method == "ibert":
        x = _shift(rows, -k["pre"])
        clipped = torch.minimum(x.abs(), -k["b"])
        erf = (torch.sign(x) * ((clipped + k["b"]) ** 2 + k["c"])) >> k["rs"]
        out = -rows * (erf + k["one"])
    else:  # sigmoid(1.702 x) = e^(x - m) / (e^(x - m) + e^(-m)) with m = max(x, 0) per element
        e1, e2 = shift_exp(rows.clamp(max=0), k, poly=False), shift_exp(-rows.clamp(min=0), k, poly=False)
        factor = INT32_MAX // (e1 + e2)
        out = rows * ((e1 * factor) >> (31 - SIGMOID_BITS))
    return out.reshape(q.shape).to(torch.int32)


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """max(1, floor(sqrt(v))) for 0 <= v < 2**31 by Newton's iteration from 2**16: I-ViT's, run to
    its fixed point (I-ViT's 10 steps stop short of it for v below about 2**12). At least 1, since
    the LayerNorm divides by it."""
    k = torch.full_like(v, 1 << 16)
    for _ in range(NEWTON_STEPS):
        k = torch.minimum(k, ((k + v // k) >> 1).clamp(min=1))
    return k


def deviation_bound(std, var_shift: int):
    """The largest |y| whose ``y >> var_shift`` squared is one term of a sum with square root
    ``std``: the deviations are normalised by it, so ``y * ((2**31 - 1) // bound)`` fits int32 while
    ``y`` keeps every bit the variance's shift dropped. Without a shift it is ``std`` itself."""
    return (std << var_shift) + ((1 << var_shift) - 1)


def layer_norm_int(q: torch.Tensor, bias_codes: torch.Tensor, in_shift: int, var_shift: int,
                   out_shift: int) -> torch.Tensor:
    """I-ViT's integer LayerNorm: int32 codes; times the per-channel output scale they are
    ``(x - mean) / std * weight + bias``. The input's scale cancels, so it is not an argument."""
    if q.dtype not in (torch.int8, torch.int32):
        raise IntegerError(f"integer LayerNorm: expects int8 or int32 codes, got {q.dtype}")
    width = q.shape[-1]
    x = q.reshape(-1, width).to(torch.int64) >> in_shift
    mean = (x.sum(-1, keepdim=True) + width // 2) // width
    y = x - mean
    shifted = y >> var_shift
    std = isqrt((shifted * shifted).sum(-1, keepdim=True))
    out = ((y * (INT32_MAX // deviation_bound(std, var_shift))) >> out_shift) + bias_codes.to(torch.int64)
    return out.reshape(q.shape).to(torch.int32)
