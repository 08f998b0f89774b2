"""Low-bit Linear ops over bit-plane weights (``fxpress.lowbit``).

- ``dequantize_planes(planes, alpha, beta, in_features, group_size, offset)``: the float32 weight;
  what a ``QuantizedLinear`` runs in eager, and the pattern ``lut_matmul`` matches. ``offset`` (an
  imported weight's value at code 0) makes it the source format's own weights, bit for bit.
- ``lut_linear(x, planes, alpha, beta, bias, in_features, group_size, max_lut_rows)``:
  ``x @ W.T + bias`` without the dequantised ``W``. Up to ``max_lut_rows`` rows of ``x`` (decode) it
  is LUT-GEMM's algorithm: for every group of ``MU`` activations a table of all ``2**MU`` signed
  sums, each weight bit-plane's ``MU``-bit slices used as indices into it, the looked-up partial
  sums scaled per (row, group, bit). Above that (prefill) it dequantises ``TILE_ROWS`` output rows
  at a time and multiplies, so the whole dequantised weight never exists either.
"""

from __future__ import annotations

import torch

import fxpress.lowbit as lowbit
from fxpress.ops._define import define_op
from fxpress.ops.lowering import Launcher, float_input_refusal

MU = 4  # activations per table (T-MAC's g = 4; LUT-GEMM uses 8)
TILE_ROWS = 1024  # output rows per step, LUT and tiled paths alike


def _check(where: str, planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, in_features: int,
           group_size: int, offset: torch.Tensor | None = None) -> None:
    lowbit.check_format(planes.shape[0], group_size, in_features)
    q, n, words = planes.shape
    groups = lowbit.padded(in_features, group_size) // group_size
    if planes.dtype != torch.int32 or words * 32 != groups * group_size:
        raise lowbit.QuantizeError(f"fxpress::{where}: planes {planes.dtype} {tuple(planes.shape)} do not hold "
                                   f"{in_features} columns in groups of {group_size}")
    if tuple(alpha.shape) != (n, groups, q) or tuple(beta.shape) != (n, groups):
        raise lowbit.QuantizeError(f"fxpress::{where}: alpha {tuple(alpha.shape)} / beta {tuple(beta.shape)} "
                                   f"should be ({n}, {groups}, {q}) / ({n}, {groups})")
    if offset is not None and tuple(offset.shape) != (n, groups):
        raise lowbit.QuantizeError(f"fxpress::{where}: offset {tuple(offset.shape)} should be ({n}, {groups})")
    for name, t in (("alpha", alpha), ("beta", beta), ("offset", offset)):
        if t is not None and t.dtype not in lowbit.SCALE_DTYPES:
            raise lowbit.QuantizeError(f"fxpress::{where}: {name} is {t.dtype}, expected one of "
                                       f"{lowbit.SCALE_DTYPES}")


# dequantize_planes --------------------------------------------------------------------------------

def _dequantize_reference(planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, in_features: int,
                          group_size: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    _check("dequantize_planes", planes, alpha, beta, in_features, group_size, offset)
    return lowbit.dequantize(planes, alpha, beta, in_features, group_size, offset)


def _dequantize_fake(planes, alpha, beta, in_features, group_size, offset=None):
    _check("dequantize_planes", planes, alpha, beta, in_features, group_size, offset)
    return alpha.new_empty(planes.shape[1], in_features, dtype=torch.float32)


dequantize_planes = define_op("dequantize_planes", _dequantize_reference, _dequantize_fake)


# lut_linear ---------------------------------------------------------------------------------------

def _sign_patterns(device: torch.device) -> torch.Tensor:
    """``[MU, 2**MU]``: column p holds the signs 2 * bit_j(p) - 1 of table entry p."""
    p = torch.arange(2 ** MU, device=device)
    return (((p.unsqueeze(0) >> torch.arange(MU, device=device).unsqueeze(1)) & 1) * 2 - 1).to(torch.float32)


def lut_rows(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
             group_size: int) -> torch.Tensor:
    """The LUT algorithm on a few rows: ``x`` float32 ``[M, K_pad]`` (zero-padded) -> ``[M, out]``."""
    m, k_pad = x.shape
    q, n, words = planes.shape
    groups = k_pad // group_size
    alpha, beta = alpha.to(torch.float32), beta.to(torch.float32)
    tables = x.view(m, k_pad // MU, MU) @ _sign_patterns(x.device)  # [M, K_pad/MU, 2^MU]
    shifts = torch.arange(0, 32, MU, device=x.device, dtype=torch.int32)
    group_sums = x.view(m, groups, group_size).sum(-1)  # for beta
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    for start in range(0, n, TILE_ROWS):
        rows = slice(start, min(start + TILE_ROWS, n))
        # Each MU-bit slice of a plane is an index into its activation group's table.
        index = ((planes[:, rows].unsqueeze(-1) >> shifts) & (2 ** MU - 1)).flatten(-2).long()  # [q, r, K/MU]
        looked_up = torch.gather(tables.unsqueeze(1).unsqueeze(1).expand(m, q, index.shape[1], -1, -1), 4,
                                 index.unsqueeze(0).expand(m, -1, -1, -1).unsqueeze(-1)).squeeze(-1)
        per_group = looked_up.view(m, q, index.shape[1], groups, group_size // MU).sum(-1)  # [M, q, r, G]
        out[:, rows] = torch.einsum("mqrg,rgq->mr", per_group, alpha[rows]) + group_sums @ beta[rows].T
    return out


def _tiled_rows(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, in_features: int,
                group_size: int) -> torch.Tensor:
    """Many rows: dequantise TILE_ROWS output rows at a time and multiply."""
    n = planes.shape[1]
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for start in range(0, n, TILE_ROWS):
        rows = slice(start, min(start + TILE_ROWS, n))
        w = lowbit.dequantize(planes[:, rows], alpha[rows], beta[rows], in_features, group_size)
        torch.mm(x[:, :in_features], w.T, out=out[:, rows])
    return out


def _lut_checks(x, planes, alpha, beta, bias, in_features, group_size, max_lut_rows) -> None:
    _check("lut_linear", planes, alpha, beta, in_features, group_size)
    if x.shape[-1] != in_features:
        raise lowbit.QuantizeError(f"fxpress::lut_linear: x has {x.shape[-1]} features, the weight {in_features}")
    if bias is not None and tuple(bias.shape) != (planes.shape[1],):
        raise lowbit.QuantizeError(f"fxpress::lut_linear: bias {tuple(bias.shape)} != ({planes.shape[1]},)")
    if max_lut_rows < 0:
        raise lowbit.QuantizeError(f"fxpress::lut_linear: max_lut_rows={max_lut_rows} must be >= 0")


def _lut_reference(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                   bias: torch.Tensor | None, in_features: int, group_size: int, max_lut_rows: int) -> torch.Tensor:
    _lut_checks(x, planes, alpha, beta, bias, in_features, group_size, max_lut_rows)
    flat = x.reshape(-1, in_features).to(torch.float32)
    k_pad = lowbit.padded(in_features, group_size)
    if flat.shape[0] <= max_lut_rows:
        out = lut_rows(torch.nn.functional.pad(flat, (0, k_pad - in_features)), planes, alpha, beta, group_size)
    else:
        out = _tiled_rows(flat, planes, alpha, beta, in_features, group_size)
    if bias is not None:
        out += bias
    return out.to(x.dtype).reshape(*x.shape[:-1], planes.shape[1])


def _lut_fake(x, planes, alpha, beta, bias, in_features, group_size, max_lut_rows):
    _lut_checks(x, planes, alpha, beta, bias, in_features, group_size, max_lut_rows)
    return x.new_empty(*x.shape[:-1], planes.shape[1])


# Table lookup for a few rows, dequantise-per-tile GEMM above (``fxpress/ops/kernels/lut.py``,
# ``fxpress/ops/cpp/lut.py``).
def _whole_word_groups(node) -> str | None:
    """The kernels read each group as whole 32-column words of the bit-planes."""
    group_size = node.args[6]
    if group_size % 32:
        return f"lut_linear with groups of {group_size} columns (GGUF Q6_K): the kernels read groups of whole words"
    return None


def _triton_refusal(node) -> str | None:
    return float_input_refusal("lut_linear")(node) or _whole_word_groups(node)


lut_linear = define_op("lut_linear", _lut_reference, _lut_fake, lowerings={
    "triton": Launcher("fxpress.ops.kernels.lut", "lut_linear", _triton_refusal),
    "cpp": Launcher("fxpress.ops.cpp.lut", "lut_linear", _whole_word_groups)})
