"""``fxpress::lut_linear`` on the cpp target (``lut.cpp``: T-MAC's table lookups for up to
``max_lut_rows`` rows, dequantised row tiles and ``torch.mm`` above).

The table path reads the weights re-laid out for byte shuffles or word permutes (32 output rows
side by side, in bytes or in byte pairs: the library says which).
That layout is made once per weight and kept while the weight tensors live and are not modified
in place (their ``_version``), so a compiled model pays it on its first call only; it holds as many
bytes again as the bit-planes and scales.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from fxpress.native.kernels import INT, LONG, POINTER, library_beside, pointer, threads
from fxpress.native.layouts import DerivedLayouts

ROWS = 32  # output rows per block (lut.cpp's ROWS)
MAX_M = 16  # activation rows per table-path call (lut.cpp's MAX_M)
TILE_ROWS = 1024  # output rows dequantised per GEMM step above max_lut_rows


@functools.cache
def _lib():
    return library_beside(__file__, "lut", {
        "fxpress_lut_gemv": (None, [POINTER, LONG, LONG, LONG, LONG, POINTER, POINTER, POINTER, POINTER, LONG,
                                    LONG, LONG, POINTER, LONG, INT]),
        "fxpress_lut_dequantize": (None, [POINTER, POINTER, POINTER, LONG, LONG, LONG, LONG, LONG, LONG, LONG,
                                          POINTER, INT]),
        "fxpress_lut_word_pairs": (INT, []),
    })


@dataclass(frozen=True)
class _Packed:
    indices: torch.Tensor  # uint8 [blocks, q, K_pad/8, 32], or [blocks, q, K_pad/16, 32, 2] in word pairs
    alpha: torch.Tensor  # float32 [blocks, groups, q, 32]
    beta: torch.Tensor  # float32 [blocks, groups, 32]

    @functools.cached_property
    def pointers(self) -> tuple[int, int, int]:
        return self.indices.data_ptr(), self.alpha.data_ptr(), self.beta.data_ptr()


def _pack(planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, word_pairs: int) -> _Packed:
    q, n, words = planes.shape
    pad = -n % ROWS
    blocks = (n + pad) // ROWS
    # Byte b of a row's plane, little-endian, holds table 2b's index (low nibble) and 2b+1's.
    data = planes.contiguous().view(torch.uint8).view(q, n, words * 4)
    if sys.byteorder != "little":
        data = data.view(q, n, words, 4).flip(-1).reshape(q, n, words * 4)
    data = torch.nn.functional.pad(data, (0, 0, 0, pad))
    if word_pairs:  # byte pair w of the 32 rows side by side
        indices = data.view(q, blocks, ROWS, words * 2, 2).permute(1, 0, 3, 2, 4).contiguous()
    else:
        indices = data.view(q, blocks, ROWS, words * 4).permute(1, 0, 3, 2).contiguous()
    a = torch.nn.functional.pad(alpha.to(torch.float32), (0, 0, 0, 0, 0, pad))
    b = torch.nn.functional.pad(beta.to(torch.float32), (0, 0, 0, pad))
    groups = alpha.shape[1]
    return _Packed(indices, a.view(blocks, ROWS, groups, q).permute(0, 2, 3, 1).contiguous(),
                   b.view(blocks, ROWS, groups).permute(0, 2, 1).contiguous())


# The shuffle layout of (planes, alpha, beta), made on first use and kept while they live unchanged.
packed = DerivedLayouts(_pack)


def lut_linear(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
               bias: torch.Tensor | None, in_features: int, group_size: int, max_lut_rows: int,
               out: torch.Tensor) -> torch.Tensor:
    q, n, words = planes.shape
    flat = x.reshape(-1, in_features)
    if flat.dtype != torch.float32 or flat.stride(-1) != 1:
        flat = flat.to(torch.float32).contiguous()
    m = flat.shape[0]
    direct = out.dtype == torch.float32 and out.is_contiguous()
    result = out.view(m, n) if direct else torch.empty(m, n, dtype=torch.float32)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    if m <= max_lut_rows:
        layout = packed(planes, alpha, beta, word_pairs=_lib().fxpress_lut_word_pairs())  # held till the kernels return
        indices, alpha_p, beta_p = layout.pointers
        gemv, x_at, out_at, bias_at, pool = _lib().fxpress_lut_gemv, flat.data_ptr(), result.data_ptr(), \
            pointer(bias32), threads()
        for start in range(0, m, MAX_M):  # 4-byte floats: row `start` is start * stride elements in
            gemv(x_at + 4 * start * flat.stride(0), flat.stride(0), min(MAX_M, m - start), in_features, words * 32,
                 indices, alpha_p, beta_p, bias_at, n, q, group_size, out_at + 4 * start * n, n, pool)
    else:
        _tiled(flat, planes.contiguous(), alpha.to(torch.float32).contiguous(), beta.to(torch.float32).contiguous(),
               in_features, group_size, result)
        if bias32 is not None:
            result += bias32
    if not direct:
        out.copy_(result.view(out.shape))
    return out


def _tiled(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, in_features: int,
           group_size: int, result: torch.Tensor) -> None:
    """Dequantise TILE_ROWS output rows at a time in C++, multiply with torch.mm."""
    q, n, words = planes.shape
    tile = torch.empty(min(TILE_ROWS, n), in_features, dtype=torch.float32)
    for start in range(0, n, TILE_ROWS):
        rows = min(TILE_ROWS, n - start)
        _lib().fxpress_lut_dequantize(pointer(planes), pointer(alpha), pointer(beta), q, n, words, group_size,
                                      in_features, start, rows, pointer(tile), threads())
        torch.mm(x, tile[:rows].T, out=result[:, start:start + rows])
