"""The integer-only algorithms once more, in NumPy, written from the papers' pseudo-code.

Every value is int64 and every intermediate is asserted to fit int32, so these functions also
check the overflow bounds the kernels rely on. They take the integer constants from
``fxpress.integer.constants`` (the float-to-integer step both sides share) and nothing else.
"""

from __future__ import annotations

import numpy as np

from fxpress.integer.constants import GELU_COLUMNS, SIGMOID_BITS, SOFTMAX_COLUMNS

I32 = 2 ** 31


def fits(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    assert np.all((a >= -I32) & (a < I32)), f"{what} leaves int32: {a.min()}..{a.max()}"
    return a


def columns(table, names, rows: int) -> dict[str, np.ndarray]:
    t = np.asarray(table, dtype=np.int64)
    t = np.broadcast_to(t, (rows, t.shape[1]))
    return {name: t[:, i:i + 1] for i, name in enumerate(names)}


def shift(value: np.ndarray, amount: np.ndarray) -> np.ndarray:
    value, amount = np.broadcast_arrays(value, amount)
    out = np.where(amount >= 0, value * (2 ** np.clip(amount, 0, 31)), value >> np.clip(-amount, 0, 31))
    return fits(out, "shifted exp")


def shift_exp(d: np.ndarray, k, poly: bool) -> np.ndarray:
    d = shift(d, -k["pre"])
    if not poly:
        d = fits(d + d // 2 - d // 16, "x log2 e")
    d = np.maximum(d, k["low"])
    q = d // k["x0"]  # both <= 0: the floor is the quotient of magnitudes
    assert np.all(q >= 0)
    r = d - k["x0"] * q
    assert np.all((r <= 0) & (r > k["x0"]))
    z = fits((r + k["b"]) * r + k["c"], "exp polynomial") if poly else fits(r - 2 * k["x0"], "2**r")
    assert np.all(z >= 0)
    return shift(z, k["norm"] - q)


def softmax(q: np.ndarray, table, poly: bool, out_bits: int) -> np.ndarray:
    rows = q.reshape(-1, q.shape[-1]).astype(np.int64)
    k = columns(table, SOFTMAX_COLUMNS, rows.shape[0])
    top = rows.max(-1, keepdims=True)
    e = shift_exp(rows - top, k, poly)
    e = np.where((rows == -128) & (top != -128), 0, e)
    total = fits(e.sum(-1, keepdims=True), "exp sum")
    assert np.all(total > 0)
    s = 31 - out_bits
    factor = (I32 - 1 - 2 ** (s - 1)) // total
    p = np.minimum(fits(e * factor + 2 ** (s - 1), "scaled exp") >> s, 2 ** out_bits - 1)
    return p.reshape(q.shape)


def gelu(q: np.ndarray, table, method: str) -> np.ndarray:
    rows = q.reshape(-1, q.shape[-1]).astype(np.int64)
    k = columns(table, GELU_COLUMNS[method], rows.shape[0])
    if method == "ibert":
        x = shift(rows, -k["pre"])
        a = np.minimum(np.abs(x), -k["b"])
        erf = fits(np.sign(x) * fits((a + k["b"]) ** 2 + k["c"], "erf polynomial"), "erf") >> k["rs"]
        out = fits(-rows * fits(erf + k["one"], "1 + erf"), "GELU")
    else:
        k = k | {"b": 0, "c": 0}
        e1, e2 = shift_exp(np.minimum(rows, 0), k, False), shift_exp(-np.maximum(rows, 0), k, False)
        denominator = fits(e1 + e2, "sigmoid denominator")
        assert np.all(denominator > 0)  # one of the two is exp(0)
        factor = (I32 - 1) // denominator
        sig = fits(e1 * factor, "sigmoid numerator") >> (31 - SIGMOID_BITS)
        out = fits(rows * sig, "GELU")
    return out.reshape(q.shape)


def isqrt(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) by bisection: a different algorithm from the kernels' Newton iteration."""
    lo, hi = np.zeros_like(v), np.full_like(v, 2 ** 16)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        below = mid * mid <= v
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return lo


def layer_norm(q: np.ndarray, bias_codes: np.ndarray, in_shift: int, var_shift: int, out_shift: int) -> np.ndarray:
    width = q.shape[-1]
    x = q.reshape(-1, width).astype(np.int64) >> in_shift
    mean = fits(x.sum(-1, keepdims=True), "row sum") + width // 2
    mean = mean // width  # floor, also for negative sums
    y = x - mean
    shifted = y >> var_shift
    var = fits((shifted * shifted).sum(-1, keepdims=True), "sum of squares")
    std = np.maximum(isqrt(var), 1)
    bound = fits(std * 2 ** var_shift + 2 ** var_shift - 1, "deviation bound")
    assert np.all(np.abs(y) <= bound)
    out = (fits(y * ((I32 - 1) // bound), "normalised") >> out_shift) + bias_codes.astype(np.int64)
    return fits(out, "LayerNorm output").reshape(q.shape)
