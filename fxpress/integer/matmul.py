"""I-BERT's integer GEMM: int8 activations times int8 weights, accumulated exactly in int32.

Weights are quantised once, symmetrically per output channel (``w ~ codes * scale[n]``, codes in
[-127, 127]); activations per row at run time (``fxpress.integer.quantize``). A product of two
codes is at most 127 * 128 in magnitude, so a sum of up to ``MAX_DEPTH`` of them fits int32 and the
accumulation is exact: the matmul itself is integer arithmetic with one right answer, whatever
kernel computes it. ``torch._int_mm`` is that kernel (cuBLASLt int8 tensor cores on CUDA, oneDNN on
the CPU); its CUDA form wants more than 16 rows and inner and outer sizes that are multiples of 8,
so smaller or ragged operands are padded with zero codes, which add nothing to any sum.
"""

from __future__ import annotations

import torch

from fxpress.core.errors import IntegerError

MAX_DEPTH = (2 ** 31 - 1) // (127 * 128)  # 132104 products of int8 codes fit an int32 sum
CUDA_MIN_ROWS = 17
CUDA_MULTIPLE = 8


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and one float32 scale per output channel (row) of a ``[out, in]`` weight."""
    w = weight.detach().to(torch.float32)
    top = w.abs().amax(1)
    scale = torch.where(top > 0, top / 127.0, torch.ones_like(top))
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def check_operands(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise IntegerError(f"{where}: expects int8 codes, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise IntegerError(f"{where}: expects [M, K] @ [K, N], got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.shape[1] > MAX_DEPTH:
        raise IntegerError(f"{where}: inner size {a.shape[1]} exceeds {MAX_DEPTH}, past which an int32 sum of "
                           "int8 products can overflow")
    if a.device != b.device:
        raise IntegerError(f"{where}: operands on {a.device} and {b.device}")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded(t: torch.Tensor, rows: int, cols: int, column_major: bool) -> torch.Tensor:
    if tuple(t.shape) == (rows, cols):
        return t
    out = (torch.zeros(cols, rows, dtype=t.dtype, device=t.device).t() if column_major
           else torch.zeros(rows, cols, dtype=t.dtype, device=t.device))
    out[:t.shape[0], :t.shape[1]] = t
    return out


def int8_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for int8 ``a [M, K]`` and ``b [K, N]``, exactly, as int32 ``[M, N]``."""
    check_operands(a, b, "fxpress::int_matmul")
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        result = torch.zeros(m, n, dtype=torch.int32, device=a.device)
        return result if out is None else out.copy_(result)
    if a.device.type == "cuda":
        rows, depth, cols = max(m, CUDA_MIN_ROWS), _round_up(k, CUDA_MULTIPLE), _round_up(n, CUDA_MULTIPLE)
        if (rows, depth, cols) != (m, k, n):
            result = torch._int_mm(_padded(a, rows, depth, False).contiguous(),
                                   _padded(b, depth, cols, b.stride(0) == 1))[:m, :n]
            return result if out is None else out.copy_(result)
    if out is None:
        return torch._int_mm(a, b)
    if out.is_contiguous():
        return torch._int_mm(a, b, out=out)
    return out.copy_(torch._int_mm(a, b))
