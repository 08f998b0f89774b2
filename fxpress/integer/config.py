"""``IntegerOnly``: which ops the ``integer_only`` pass rewrites, and with which integer algorithm.

    backend = fxpress.backend(integer=fxpress.IntegerOnly())                 # I-BERT, dynamic scales
    backend = fxpress.backend(integer=fxpress.IntegerOnly(method="shift"))   # I-ViT Shiftmax/ShiftGELU
    calibration = fxpress.calibrate_integer(model, samples)                  # per-tensor scales
    backend = fxpress.backend(integer=fxpress.IntegerOnly(calibration=calibration))

Every field is checked here, when the options are made, so a bad shift parameter is refused with
its valid range before any compile starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fxpress.core.errors import IntegerError
from fxpress.integer.calibration import IntegerCalibration

METHODS = ("ibert", "shift")
OP_KINDS = ("softmax", "gelu", "layer_norm", "linear")
# Linear layers are asked for by name: their int8 weights change every GEMM's numbers, where the
# other three change only the nonlinearities.
DEFAULT_OPS = ("softmax", "gelu", "layer_norm")

# Longest softmax row the int32 exp sum can hold is 2**(31 - exp_bits) - 1; the defaults below
# allow rows of 65535 (softmax) and keep sigmoid numerator plus denominator under 2**31 (GELU).
_DEFAULT_EXP_BITS = {"softmax": 15, "gelu": 22}
# The paper's exponent clip: exp(x) is 0 once x < max_q * ln 2 (I-BERT n = 30, I-ViT n = 15 / 23).
_DEFAULT_MAX_Q = {("ibert", "softmax"): 30, ("shift", "softmax"): 15, ("shift", "gelu"): 23}


def check_int(name: str, value: Any, low: int, high: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise IntegerError(f"IntegerOnly {name}={value!r} is invalid: expected an int in [{low}, {high}] ({why})")
    return value


@dataclass(frozen=True)
class IntegerOnly:
    """Options of the ``integer_only`` pass.

    - ``method``: ``"ibert"`` (polynomial exp, i-GELU erf polynomial) or ``"shift"`` (I-ViT's
      Shiftmax and ShiftGELU: exp by shifts, GELU as x * sigmoid(1.702 x); the sigmoid subtracts
      max(x, 0) per element, where I-ViT subtracts the row's maximum). LayerNorm is I-ViT's
      integer LayerNorm with a Newton integer square root under both.
    - ``ops``: which of softmax, gelu, layer_norm and linear to rewrite (the first three by
      default). ``"linear"`` is I-BERT's integer GEMM: each linear layer with a frozen weight runs
      on int8 codes (activations per row at run time, or at a calibrated scale; weights per output
      channel), accumulated exactly in int32 by ``torch._int_mm`` (int8 tensor cores on CUDA),
      then scaled back to float with the bias added. Matmuls of two activations (attention's
      ``q @ k^T`` and ``p @ v``) stay float.
    - ``calibration``: per-tensor input scales from :func:`fxpress.calibrate_integer`; sites it does
      not cover, and every site when it is None, quantise each row with its own scale at run time.
    - ``sdpa``: also rewrite ``scaled_dot_product_attention`` by decomposing it into
      matmul, integer softmax and matmul (the softmax inside fused attention is otherwise unreachable).
    - ``softmax_bits``: bits of the softmax output (probabilities at scale 2**-bits); 8 as I-BERT.
    - ``softmax_exp_bits`` / ``gelu_exp_bits``: bits the integer exp values are normalised to.
    - ``max_q``: the exponent clip (None: the paper's value for the method).
    - ``layer_norm_input_bits``: bits of the LayerNorm input codes, 8 (int8) to 22. 22 by default,
      I-BERT's ``ln_input_bit``: a residual stream has outlier channels, and at int8 its small
      channels drown (MiniLM embedding cosine 0.9918 with LayerNorm alone integer at 8 bits,
      0.99997 at 12, 1.00000 at 16 and 22).
    """

    method: str = "ibert"
    ops: tuple[str, ...] = DEFAULT_OPS
    calibration: Any = None
    sdpa: bool = False
    softmax_bits: int = 8
    softmax_exp_bits: int = _DEFAULT_EXP_BITS["softmax"]
    gelu_exp_bits: int = _DEFAULT_EXP_BITS["gelu"]
    max_q: int | None = None
    layer_norm_input_bits: int = 22

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise IntegerError(f"IntegerOnly method={self.method!r} is invalid: expected one of {METHODS}")
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        unknown = [op for op in ops if op not in OP_KINDS]
        if unknown or not ops:
            raise IntegerError(f"IntegerOnly ops={self.ops!r} is invalid: expected a non-empty subset of {OP_KINDS}")
        object.__setattr__(self, "ops", ops)
        if self.calibration is not None and not isinstance(self.calibration, IntegerCalibration):
            raise IntegerError("IntegerOnly calibration= takes what fxpress.calibrate_integer(model, samples) "
                               f"returns, got {type(self.calibration).__name__}")
        if not isinstance(self.sdpa, bool):
            raise IntegerError(f"IntegerOnly sdpa={self.sdpa!r} is invalid: expected a bool")
        check_int("softmax_bits", self.softmax_bits, 2, 15, "probabilities are stored in uint8 up to 8 bits, int16 above")
        check_int("softmax_exp_bits", self.softmax_exp_bits, 4, 24,
                  "the row sum of exp values, each below 2**exp_bits, must fit int32")
        check_int("gelu_exp_bits", self.gelu_exp_bits, 4, 29,
                  "two exp values below 2**exp_bits are added in int32")
        check_int("layer_norm_input_bits", self.layer_norm_input_bits, 8, 22,
                  "int8 codes, or int32 codes as wide as I-BERT's 22-bit LayerNorm input")
        if self.max_q is not None:
            check_int("max_q", self.max_q, 1, 30, "exponent clip: shifts past 30 leave nothing of an int32")

    def clip(self, kind: str) -> int:
        """The exponent clip of ``kind``'s exp (None when that exp has no clip)."""
        return self.max_q if self.max_q is not None else _DEFAULT_MAX_Q.get((self.method, kind), 30)
