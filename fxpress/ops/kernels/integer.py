"""Triton kernels of the integer-only ops: int32 arithmetic and shifts, a block of rows per program.

Each launcher takes the op's arguments plus ``out``. Each program first turns its row's float scale
into the integer constants of ``fxpress.integer.constants``, with the same float64 operations in
the same order (each exactly rounded on every device), so kernel and reference agree to the bit;
a per-tensor scale is read with stride 0. Everything after that is integer arithmetic. Every
integer division has a non-negative numerator and a positive denominator, so Triton's truncating
``//`` and the references' floor division agree; every shift amount is in [0, 31].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpress.integer import constants, matmul
from fxpress.integer.arith import MASKED, NEWTON_STEPS, check_row_length
from fxpress.integer.quantize import code_limit, mask_limit, reciprocal
from fxpress.ops.lowering import rows_of

INT32_MAX = 2 ** 31 - 1
MAX_BLOCK = 1024


ROW_BLOCK_ELEMENTS = 2048  # a program takes this many elements of short rows at once


def _block(width: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(int(width), 1)))


def _row_grid(rows: int, width: int) -> tuple[tuple[int], dict[str, int]]:
    """Programs and block sizes: several short rows per program (one program per row costs a
    launch slot and a scale's integer constants per 128 elements), one long row per program."""
    block = _block(width)
    per_program = max(1, min(64, ROW_BLOCK_ELEMENTS // block))
    return (triton.cdiv(rows, per_program),), {"ROWS": per_program, "BLOCK": block}


@triton.jit
def _shift(value, amount):
    """value * 2**amount, floored; the right shift saturates at 31."""
    left = value << tl.maximum(amount, 0)
    right = value >> tl.minimum(tl.maximum(-amount, 0), 31)
    return tl.where(amount >= 0, left, right)


@triton.jit
def _exponent(x):
    """frexp's exponent of a positive normal float64: x in [2**(e-1), 2**e)."""
    return (((x.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022).to(tl.int32)


@triton.jit
def _pow2(k):
    """2.0**k as a float64, exactly, for an int k in [-1022, 1023]."""
    return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _normalise(s):
    """constants._normalise: (pre, s * 2**pre) in [2**-14, 2**-13), pre >= -20."""
    pre = tl.maximum(-13 - _exponent(s), -20)
    return pre, s * _pow2(pre)


@triton.jit
def _softmax_constants(s, coef, POLY: tl.constexpr, EXP_BITS: tl.constexpr, MAX_Q: tl.constexpr):
    """constants.softmax_constants for one float64 scale."""
    pre, sp = _normalise(s)
    if POLY:
        x0 = tl.floor(tl.load(coef) / sp)
        b = tl.floor(tl.load(coef + 1) / sp)
        c = tl.floor(tl.load(coef + 2) / (sp * sp))
        top = c
    else:
        x0 = tl.floor(-1.0 / sp)
        b = x0 * 0.0
        c = x0 * 0.0
        top = -2.0 * x0
    x0 = x0.to(tl.int32)
    return pre, x0, b.to(tl.int32), c.to(tl.int32), EXP_BITS - _exponent(top), MAX_Q * x0


@triton.jit
def _shift_exp(d, pre, x0, b, c, norm, low, POLY: tl.constexpr):
    """exp of codes d <= 0, normalised: I-BERT's polynomial (POLY) or I-ViT's shift form."""
    d = _shift(d, -pre)
    if not POLY:
        d = d + (d >> 1) - (d >> 4)
    d = tl.maximum(d, low)
    q = (-d) // (-x0)
    r = d - x0 * q
    if POLY:
        z = (r + b) * r + c
    else:
        z = r - 2 * x0
    return _shift(z, norm - q)


@triton.jit
def _kept_exp(v, m, pre, x0, b, c, norm, low, POLY: tl.constexpr):
    """A softmax row's exp values of codes ``v`` under its maximum code ``m``: 0 at masked codes
    (-128) unless the whole row is masked (then it is uniform, as eager's)."""
    return tl.where((v != -128) | (m == -128), _shift_exp(v - m, pre, x0, b, c, norm, low, POLY), 0)


@triton.jit
def _normalising_factor(total, OUT_BITS: tl.constexpr):
    """Per row, what turns exp values into probabilities at 2**-OUT_BITS (arith.normalise)."""
    HALF: tl.constexpr = 1 << (30 - OUT_BITS)
    return (2147483647 - HALF) // tl.sum(total, 1)[:, None]


@triton.jit
def _probability(e, factor, OUT_BITS: tl.constexpr):
    SHIFT: tl.constexpr = 31 - OUT_BITS
    HALF: tl.constexpr = 1 << (SHIFT - 1)
    return tl.minimum((e * factor + HALF) >> SHIFT, (1 << OUT_BITS) - 1)


@triton.jit
def _row_block(rows, width, start, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's rows (``[ROWS]``, their offsets ``[ROWS, 1]``, which exist) and, from
    ``start``, one block of columns (``[1, BLOCK]``) with the mask of the elements that exist."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = r < rows
    cols = start + tl.arange(0, BLOCK)[None, :]
    return r, r.to(tl.int64)[:, None] * width, live, cols, live[:, None] & (cols < width)


@triton.jit
def int_row_scale_kernel(x, out, rows, width, limit, MASK: tl.constexpr, INV_LIMIT: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r, base, live, _, _ = _row_block(rows, width, 0, ROWS, BLOCK)
    top = tl.zeros([ROWS, BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        v = tl.load(x + base + cols, mask=inside, other=0.0).to(tl.float32)
        magnitude = tl.abs(v)
        if MASK:
            magnitude = tl.where(v <= limit, 0.0, magnitude)
        top = tl.maximum(top, magnitude)
    m = tl.max(top, 1)
    tl.store(out + r, tl.where(m > 0, m * INV_LIMIT, 1.0), mask=live)


@triton.jit
def int_gelu_scale_kernel(scale, coef, out, n, POLY: tl.constexpr, ERF_BITS: tl.constexpr, SIG_BITS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """constants.gelu_output_scale, elementwise over the scales."""
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(scale + at, mask=at < n, other=1.0).to(tl.float64)
    if POLY:
        pre, se = _normalise(s / tl.load(coef + 3))
        a = tl.load(coef + 6)
        rs = tl.maximum(_exponent(-tl.floor(tl.load(coef + 5) / (se * se))) - ERF_BITS, 0)
        result = -s * (se * se * a * _pow2(rs)) / 2.0
    else:
        result = s * (1.0 / (1 << SIG_BITS))  # a power of two: exact
    tl.store(out + at, result.to(out.dtype.element_ty), mask=at < n)


@triton.jit
def int_quantize_kernel(x, inv, out, rows, width, inv_stride, limit, MASK: tl.constexpr, LIMIT: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r, base, live, _, _ = _row_block(rows, width, 0, ROWS, BLOCK)
    reciprocal = tl.load(inv + r * inv_stride, mask=live, other=1.0)[:, None]
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        v = tl.load(x + base + cols, mask=inside, other=0.0).to(tl.float32)
        code = tl.minimum(tl.maximum(tl.floor(v * reciprocal + 0.5), -LIMIT), LIMIT).to(tl.int32)
        if MASK:
            code = tl.where(v <= limit, -128, code)
        tl.store(out + base + cols, code.to(out.dtype.element_ty), mask=inside)


@triton.jit
def int_softmax_kernel(q, scale, coef, out, rows, width, s_stride, POLY: tl.constexpr, EXP_BITS: tl.constexpr,
                       MAX_Q: tl.constexpr, OUT_BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r, base, live, _, _ = _row_block(rows, width, 0, ROWS, BLOCK)
    s = tl.load(scale + r * s_stride, mask=live, other=1.0).to(tl.float64)
    pre, x0, b, c, norm, low = _softmax_constants(s, coef, POLY, EXP_BITS, MAX_Q)
    pre, x0, b, c, norm, low = pre[:, None], x0[:, None], b[:, None], c[:, None], norm[:, None], low[:, None]
    top = tl.full([ROWS, BLOCK], -128, tl.int32)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        top = tl.maximum(top, tl.load(q + base + cols, mask=inside, other=-128).to(tl.int32))
    m = tl.max(top, 1)[:, None]
    total = tl.zeros([ROWS, BLOCK], tl.int32)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        v = tl.load(q + base + cols, mask=inside, other=-128).to(tl.int32)
        total += tl.where(cols < width, _kept_exp(v, m, pre, x0, b, c, norm, low, POLY), 0)
    factor = _normalising_factor(total, OUT_BITS)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        v = tl.load(q + base + cols, mask=inside, other=-128).to(tl.int32)
        p = _probability(_kept_exp(v, m, pre, x0, b, c, norm, low, POLY), factor, OUT_BITS)
        tl.store(out + base + cols, p.to(out.dtype.element_ty), mask=inside)


@triton.jit
def _masked_codes(v, reciprocal, limit):
    """int_quantize_kernel's int8 codes of a softmax input (masked positions -128)."""
    code = tl.minimum(tl.maximum(tl.floor(v * reciprocal + 0.5), -127.0), 127.0).to(tl.int32)
    return tl.where(v <= limit, -128, code)


@triton.jit
def int_softmax_dynamic_kernel(x, coef, out, rows, width, limit, INV_LIMIT: tl.constexpr, POLY: tl.constexpr,
                               EXP_BITS: tl.constexpr, MAX_Q: tl.constexpr, OUT_BITS: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """int_row_scale_kernel, int_quantize_kernel and int_softmax_kernel of float rows in one: the
    codes are recomputed from ``x`` in each pass instead of written out and read back."""
    r, base, live, _, _ = _row_block(rows, width, 0, ROWS, BLOCK)
    top = tl.zeros([ROWS, BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        v = tl.load(x + base + cols, mask=inside, other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.where(v <= limit, 0.0, tl.abs(v)))
    m = tl.max(top, 1)
    s32 = tl.where(m > 0, m * INV_LIMIT, 1.0)
    reciprocal = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), s32)[:, None]  # as torch rounds 1 / scale
    pre, x0, b, c, norm, low = _softmax_constants(s32.to(tl.float64), coef, POLY, EXP_BITS, MAX_Q)
    pre, x0, b, c, norm, low = pre[:, None], x0[:, None], b[:, None], c[:, None], norm[:, None], low[:, None]
    biggest = tl.full([ROWS, BLOCK], -128, tl.int32)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        v = tl.load(x + base + cols, mask=inside, other=0.0).to(tl.float32)
        biggest = tl.maximum(biggest, tl.where(inside, _masked_codes(v, reciprocal, limit), -128))
    mq = tl.max(biggest, 1)[:, None]
    total = tl.zeros([ROWS, BLOCK], tl.int32)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        v = tl.where(inside, _masked_codes(tl.load(x + base + cols, mask=inside, other=0.0).to(tl.float32),
                                           reciprocal, limit), -128)
        total += tl.where(cols < width, _kept_exp(v, mq, pre, x0, b, c, norm, low, POLY), 0)
    factor = _normalising_factor(total, OUT_BITS)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        v = tl.where(inside, _masked_codes(tl.load(x + base + cols, mask=inside, other=0.0).to(tl.float32),
                                           reciprocal, limit), -128)
        p = _probability(_kept_exp(v, mq, pre, x0, b, c, norm, low, POLY), factor, OUT_BITS)
        tl.store(out + base + cols, p.to(out.dtype.element_ty), mask=inside)


@triton.jit
def int_gelu_kernel(q, scale, coef, out, rows, width, s_stride, POLY: tl.constexpr, EXP_BITS: tl.constexpr,
                    MAX_Q: tl.constexpr, ERF_BITS: tl.constexpr, SIG_BITS: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK: tl.constexpr):
    r, base, live, _, _ = _row_block(rows, width, 0, ROWS, BLOCK)
    s = tl.load(scale + r * s_stride, mask=live, other=1.0).to(tl.float64)
    if POLY:  # I-BERT i-GELU: x (1 + erf(x / sqrt 2)) / 2, erf by a clipped second-order polynomial
        pre, se = _normalise(s / tl.load(coef + 3))
        b = tl.floor(tl.load(coef + 4) / se)
        c = tl.floor(tl.load(coef + 5) / (se * se))
        rs = tl.maximum(_exponent(-c) - ERF_BITS, 0)
        one = tl.floor(1.0 / (se * se * tl.load(coef + 6) * _pow2(rs))).to(tl.int32)[:, None]
        pre, b, c, rs = pre[:, None], b.to(tl.int32)[:, None], c.to(tl.int32)[:, None], rs[:, None]
        for start in range(0, width, BLOCK):
            _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
            v = tl.load(q + base + cols, mask=inside, other=0).to(tl.int32)
            x = _shift(v, -pre)
            a = tl.minimum(tl.abs(x), -b)
            sign = tl.where(x > 0, 1, tl.where(x < 0, -1, 0))
            erf = (sign * ((a + b) * (a + b) + c)) >> rs
            tl.store(out + base + cols, -v * (erf + one), mask=inside)
    else:  # I-ViT ShiftGELU: x sigmoid(1.702 x), sigmoid = e^(x-m) / (e^(x-m) + e^-m), m = max(x, 0)
        pre, sg = _normalise(s * tl.load(coef + 7))
        x0f = tl.floor(-1.0 / sg)
        norm = (EXP_BITS - _exponent(-2.0 * x0f))[:, None]
        x0 = x0f.to(tl.int32)[:, None]
        low = MAX_Q * x0
        pre = pre[:, None]
        for start in range(0, width, BLOCK):
            _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
            v = tl.load(q + base + cols, mask=inside, other=0).to(tl.int32)
            e1 = _shift_exp(tl.minimum(v, 0), pre, x0, 0, 0, norm, low, False)
            e2 = _shift_exp(-tl.maximum(v, 0), pre, x0, 0, 0, norm, low, False)
            factor = 2147483647 // (e1 + e2)
            tl.store(out + base + cols, v * ((e1 * factor) >> (31 - SIG_BITS)), mask=inside)


@triton.jit
def int_layer_norm_kernel(q, bias, out, rows, width, IN_SHIFT: tl.constexpr, VAR_SHIFT: tl.constexpr,
                          OUT_SHIFT: tl.constexpr, STEPS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r, base, live, _, _ = _row_block(rows, width, 0, ROWS, BLOCK)
    acc = tl.zeros([ROWS, BLOCK], tl.int32)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        acc += tl.load(q + base + cols, mask=inside, other=0).to(tl.int32) >> IN_SHIFT
    n = tl.sum(acc, 1) + width // 2
    mean = tl.where(n >= 0, n // width, -((width - 1 - n) // width))[:, None]  # floor division
    acc = tl.zeros([ROWS, BLOCK], tl.int32)
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        x = tl.load(q + base + cols, mask=inside, other=0).to(tl.int32) >> IN_SHIFT
        y = tl.where(cols < width, (x - mean) >> VAR_SHIFT, 0)
        acc += y * y
    var = tl.sum(acc, 1)
    std = tl.full([ROWS], 65536, tl.int32)
    for _ in tl.static_range(STEPS):  # Newton's integer square root, from 2**16
        std = tl.minimum(std, tl.maximum((std + var // std) >> 1, 1))
    factor = (2147483647 // ((std << VAR_SHIFT) + ((1 << VAR_SHIFT) - 1)))[:, None]  # arith.deviation_bound
    for start in range(0, width, BLOCK):
        _, _, _, cols, inside = _row_block(rows, width, start, ROWS, BLOCK)
        x = tl.load(q + base + cols, mask=inside, other=0).to(tl.int32) >> IN_SHIFT
        y = x - mean
        o = ((y * factor) >> OUT_SHIFT) + tl.load(bias + cols, mask=cols < width, other=0)
        tl.store(out + base + cols, o, mask=inside)


# Launchers: the op's arguments, then ``out``. -----------------------------------------------------

_COEFFICIENTS: dict[torch.device, torch.Tensor] = {}


def _coefficients(device: torch.device) -> torch.Tensor:
    if device not in _COEFFICIENTS:
        _COEFFICIENTS[device] = torch.tensor(constants.COEFFICIENTS, dtype=torch.float64, device=device)
    return _COEFFICIENTS[device]


def _scales(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One float32 scale per row (stride 1), or one for all rows (stride 0)."""
    flat = scale.reshape(-1).to(torch.float32).contiguous()
    return flat, 0 if flat.numel() == 1 else 1


def int_row_scale(x: torch.Tensor, masked: bool, bits: int, out: torch.Tensor) -> torch.Tensor:
    x, rows, width = rows_of(x)
    if rows:
        grid, blocks = _row_grid(rows, width)
        int_row_scale_kernel[grid](x, out, rows, width, mask_limit(x.dtype), MASK=masked,
                                   INV_LIMIT=float(torch.tensor(1.0 / code_limit(bits), dtype=torch.float32)),
                                   **blocks)
    return out


def int_gelu_scale(scale: torch.Tensor, method: str, out: torch.Tensor) -> torch.Tensor:
    n = scale.numel()
    if n:
        int_gelu_scale_kernel[(triton.cdiv(n, 256),)](scale.contiguous(), _coefficients(scale.device), out, n,
                                                      POLY=method == "ibert", ERF_BITS=constants.ERF_BITS,
                                                      SIG_BITS=constants.SIGMOID_BITS, BLOCK=256)
    return out


def int_quantize(x: torch.Tensor, scale: torch.Tensor, masked: bool, bits: int, out: torch.Tensor) -> torch.Tensor:
    x, rows, width = rows_of(x)
    inv = reciprocal(scale).reshape(-1).contiguous()
    if rows:
        grid, blocks = _row_grid(rows, width)
        int_quantize_kernel[grid](x, inv, out, rows, width, 0 if inv.numel() == 1 else 1, mask_limit(x.dtype),
                                  MASK=masked, LIMIT=float(code_limit(bits)), enable_fp_fusion=False, **blocks)
    return out


def int_softmax(q: torch.Tensor, scale: torch.Tensor, method: str, max_q: int, exp_bits: int, out_bits: int,
                out: torch.Tensor) -> torch.Tensor:
    q, rows, width = rows_of(q)
    check_row_length(width, exp_bits)
    scales, stride = _scales(scale)
    if rows:
        grid, blocks = _row_grid(rows, width)
        int_softmax_kernel[grid](q, scales, _coefficients(q.device), out, rows, width, stride, POLY=method == "ibert",
                                 EXP_BITS=exp_bits, MAX_Q=max_q, OUT_BITS=out_bits, **blocks)
    return out


def int_softmax_dynamic(x: torch.Tensor, method: str, max_q: int, exp_bits: int, out_bits: int,
                        out: torch.Tensor) -> torch.Tensor:
    limit = mask_limit(x.dtype)
    x, rows, width = rows_of(x)
    check_row_length(width, exp_bits)
    if rows:
        grid, blocks = _row_grid(rows, width)
        # No fused multiply-adds: the codes round x * (1 / scale) + 1/2 as int_quantize_kernel does.
        int_softmax_dynamic_kernel[grid](x, _coefficients(x.device), out, rows, width, limit,
                                         INV_LIMIT=float(torch.tensor(1.0 / code_limit(8), dtype=torch.float32)),
                                         POLY=method == "ibert", EXP_BITS=exp_bits, MAX_Q=max_q, OUT_BITS=out_bits,
                                         enable_fp_fusion=False, **blocks)
    return out


def int_gelu(q: torch.Tensor, scale: torch.Tensor, method: str, max_q: int, exp_bits: int,
             out: torch.Tensor) -> torch.Tensor:
    q, rows, width = rows_of(q)
    scales, stride = _scales(scale)
    if rows:
        grid, blocks = _row_grid(rows, width)
        int_gelu_kernel[grid](q, scales, _coefficients(q.device), out, rows, width, stride, POLY=method == "ibert",
                              EXP_BITS=exp_bits, MAX_Q=max_q, ERF_BITS=constants.ERF_BITS,
                              SIG_BITS=constants.SIGMOID_BITS, **blocks)
    return out


def int_layer_norm(q: torch.Tensor, bias_codes: torch.Tensor, in_shift: int, var_shift: int, out_shift: int,
                   out: torch.Tensor) -> torch.Tensor:
    q, rows, width = rows_of(q)
    if rows:
        grid, blocks = _row_grid(rows, width)
        int_layer_norm_kernel[grid](q, bias_codes.contiguous(), out, rows, width, IN_SHIFT=in_shift,
                                    VAR_SHIFT=var_shift, OUT_SHIFT=out_shift, STEPS=NEWTON_STEPS, **blocks)
    return out


assert MASKED == -128  # the kernels spell the masked code as a literal


def int_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """cuBLASLt's int8 GEMM through ``torch._int_mm`` (padded where it needs it), into ``out``."""
    return matmul.int8_matmul(a, b, out)
