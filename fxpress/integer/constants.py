"""Integer constants of each integer-only op, derived from the float scale of its input codes.

This is the one place with float arithmetic: I-BERT and I-ViT turn each polynomial coefficient and
each ``ln 2`` into an integer at the input's scale (``b_int = floor(b / s)``), and so do we, in
float64, a few scalar operations per row. The Triton kernels compute the same constants in-kernel
with the same float64 operations in the same order (``COEFFICIENTS`` hands them the same float64
coefficients), each exactly rounded, so kernel and reference agree to the bit; the rest of each
kernel is integer arithmetic.

Two additions keep every value inside int32 (the papers compute in float and never needed them):

- ``pre``: the codes are shifted (right by ``pre``, or left by ``-pre``) so that the scale the
  exp or erf works at lies in [2**-14, 2**-13). I-BERT's constants assume a fine scale (its inputs
  are int32 sums): at an int8 scale such as 0.3, ``x0 = floor(-1/s)`` is -4 where -3.3 is meant,
  a 20 % error in the base of the exponential. Shifting the codes left refines the scale without
  losing a bit; shifting right (scales below 2**-14) keeps the constants inside int32, and such
  inputs span less than 0.01, where softmax and GELU are nearly linear. Left shifts stop at 20
  (scales above 2**7), so shifted codes stay below 2**28;
- ``norm``: a signed shift that puts the largest exp value in ``[2**(exp_bits-1), 2**exp_bits)``,
  the role of I-BERT's 16-bit requantisation of exp and of I-ViT's ``2**n`` factor.
"""

from __future__ import annotations

import math

import torch

from fxpress.core.errors import IntegerError

MIN_SCALE = 2.0 ** -14  # the exp and erf work at scales in [MIN_SCALE, 2 * MIN_SCALE)
MAX_REFINE = -20  # the most the codes are shifted left to get there
LN2 = 0.6931  # I-BERT's x0 = -ln 2
# I-BERT's exp(p) ~ a p^2 + b p + c on (-ln 2, 0], evaluated as a (p + b/a) p + c/a.
EXP_A, EXP_B, EXP_C = 0.35815147, 0.96963238, 1.0
# I-BERT's erf(x) ~ sgn(x) [a (min(|x|, -b) + b)^2 + 1], applied at x / sqrt(2).
ERF_A, ERF_B, SQRT2 = -0.2888, -1.769, 1.4142
SIGMOID_SLOPE = 1.702  # I-ViT's ShiftGELU: GELU(x) ~ x sigmoid(1.702 x)
SIGMOID_BITS = 15  # ShiftGELU's sigmoid at scale 2**-15 (I-ViT keeps 7 bits; 15 cost nothing here)
ERF_BITS = 15  # i-GELU's erf value is shifted right until it fits in 15 bits (I-BERT: a fixed 14)

# Column order of the per-row constant tables the kernels read.
SOFTMAX_COLUMNS = ("pre", "x0", "b", "c", "norm", "low")
GELU_COLUMNS = {"ibert": ("pre", "b", "c", "rs", "one"), "shift": ("pre", "x0", "norm", "low")}


def check_scale(scale: torch.Tensor, where: str) -> torch.Tensor:
    """``scale`` as float64; refused, naming ``where``, unless every entry is finite and positive."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise IntegerError(f"{where}: the scale must be a floating-point tensor, got {scale!r}")
    s = scale.detach().to(torch.float64)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        raise IntegerError(f"{where}: scales must be finite and positive; got {s[bad].flatten()[:4].tolist()} "
                           f"at {bad.nonzero()[:4].tolist()}")
    return s


def bit_length(t: torch.Tensor) -> torch.Tensor:
    """Bits of each positive integer in ``t`` (exact: frexp of a float64 below 2**53)."""
    return torch.frexp(t.to(torch.float64)).exponent.to(torch.int64)


def _normalise(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, s * 2**pre) with ``s * 2**pre`` in [2**-14, 2**-13) (``pre >= -20``): from ``s``'s
    binary exponent, ``s`` in [2**(e-1), 2**e), so no rounding is involved."""
    pre = (-13 - torch.frexp(s).exponent.to(torch.int64)).clamp(min=MAX_REFINE)
    return pre, s * torch.exp2(pre.to(torch.float64))


# The float64 coefficients, in the order the kernels read them.
COEFFICIENT_NAMES = ("neg_ln2", "exp_b_a", "exp_c_a", "sqrt2", "erf_b", "erf_inv_a", "erf_a", "sigmoid_slope")
COEFFICIENTS = (-LN2, EXP_B / EXP_A, EXP_C / EXP_A, SQRT2, ERF_B, 1.0 / ERF_A, ERF_A, SIGMOID_SLOPE)


def _table(columns: dict[str, torch.Tensor], order: tuple[str, ...]) -> torch.Tensor:
    table = torch.stack([columns[name].reshape(-1).to(torch.int64) for name in order], dim=-1)
    if bool((table.abs() >= 2 ** 31).any()):
        raise IntegerError(f"integer constants {order} overflow int32: {table.tolist()[:2]}")
    return table.to(torch.int32)


def softmax_constants(scale: torch.Tensor, method: str, exp_bits: int, max_q: int) -> torch.Tensor:
    """int32 ``[rows, 6]`` (``SOFTMAX_COLUMNS``) for inputs at ``scale`` (one per row, or one)."""
    pre, s = _normalise(check_scale(scale, "integer softmax"))
    if method == "ibert":
        x0 = torch.floor(-LN2 / s)
        b = torch.floor((EXP_B / EXP_A) / s)
        c = torch.floor((EXP_C / EXP_A) / (s * s))
        top = c
    else:  # I-ViT's shift exp works in base 2: x0 is the code of -1.0 after x * log2(e)
        x0 = torch.floor(-1.0 / s)
        b = c = torch.zeros_like(s)
        top = -2 * x0
    norm = exp_bits - bit_length(top)
    return _table({"pre": pre, "x0": x0, "b": b, "c": c, "norm": norm, "low": max_q * x0}, SOFTMAX_COLUMNS)


def gelu_constants(scale: torch.Tensor, method: str, exp_bits: int, max_q: int) -> torch.Tensor:
    """int32 ``[rows, K]`` (``GELU_COLUMNS[method]``) for inputs at ``scale``."""
    s = check_scale(scale, "integer GELU")
    if method == "ibert":
        pre, se = _normalise(s / SQRT2)
        b = torch.floor(ERF_B / se)
        c = torch.floor((1.0 / ERF_A) / (se * se))
        rs = (bit_length(-c) - ERF_BITS).clamp(min=0)
        one = torch.floor(1.0 / (se * se * ERF_A * torch.exp2(rs.to(torch.float64))))
        return _table({"pre": pre, "b": b, "c": c, "rs": rs, "one": one}, GELU_COLUMNS["ibert"])
    pre, sg = _normalise(s * SIGMOID_SLOPE)
    x0 = torch.floor(-1.0 / sg)
    return _table({"pre": pre, "x0": x0, "norm": exp_bits - bit_length(-2 * x0), "low": max_q * x0},
                  GELU_COLUMNS["shift"])


def gelu_output_scale(scale: torch.Tensor, method: str) -> torch.Tensor:
    """The float scale of the int32 codes ``int_gelu`` returns, shaped like ``scale``."""
    s = check_scale(scale, "integer GELU")
    if method == "ibert":
        pre, se = _normalise(s / SQRT2)
        rs = (bit_length(-torch.floor((1.0 / ERF_A) / (se * se))) - ERF_BITS).clamp(min=0)
        out = -s * (se * se * ERF_A * torch.exp2(rs.to(torch.float64))) / 2
    else:
        out = s * 2.0 ** -SIGMOID_BITS
    return out.to(scale.dtype)


# Bits of the largest |code| each producer emits: what an integer LayerNorm fed by it must hold.
GELU_OUTPUT_BITS = {"ibert": 7 + ERF_BITS + 1 + 1, "shift": 7 + SIGMOID_BITS}


def layer_norm_shifts(width: int, in_bits: int) -> tuple[int, int]:
    """(in_shift, var_shift) so the row sum and the sum of squares of a ``width`` row of codes
    below ``2**in_bits`` stay inside int32."""
    if not 1 <= width <= 2 ** 14:
        raise IntegerError(f"integer LayerNorm: rows of {width} elements; the int32 row sum holds at most 16384")
    in_shift = max(0, in_bits - 16)
    bits = in_bits - in_shift
    log_width = max(0, math.ceil(math.log2(width)))
    var_shift = max(0, math.ceil((log_width + 2 * bits + 2 - 30) / 2))
    return in_shift, var_shift


def layer_norm_affine(weight: torch.Tensor | None, bias: torch.Tensor | None, width: int
                      ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(out_shift, int32 bias codes, float output scale per channel) that fold the affine step
    into the codes as I-ViT does: ``y = (normalised + bias/weight) * weight``."""
    w = torch.ones(width, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    b = torch.zeros(width, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    if bool((w == 0).any()) or not bool(torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise IntegerError("integer LayerNorm folds bias/weight into the codes, so every weight must be finite "
                           f"and nonzero; channels {((w == 0) | ~torch.isfinite(w)).nonzero().flatten()[:8].tolist()} are not")
    ratio = float((b / w).abs().max()) / math.sqrt(width)
    out_shift = max(1, math.floor(math.log2(1.0 + ratio)) + 2)
    if out_shift > 30:
        raise IntegerError(f"integer LayerNorm: |bias/weight| reaches {ratio * math.sqrt(width):.3g}, too far "
                           "from the normalised range for int32 codes")
    unit = math.sqrt(width) * 2.0 ** out_shift / 2.0 ** 31  # the value of one output code, before weight
    bias_codes = torch.round(b / w / unit).to(torch.int32)
    return out_shift, bias_codes, (w * unit).to(torch.float32)
