"""Low-bit weights as bit-planes with per-group scales: the format LUT matmul reads.

Every quantised weight row group is ``w ~ sum_i alpha_i * s_i + beta`` with signs
``s_i = 2 b_i - 1`` (``b_i`` the i-th bit-plane), one ``alpha`` per (row, group, bit) and one ``beta``
per (row, group). Both quantisers land in it:

- uniform asymmetric round-to-nearest (``rtn``): ``w = scale * (code - zero)`` with
  ``code = sum_i 2**i b_i``, i.e. ``alpha_i = scale * 2**(i-1)``, ``beta = scale * ((2**q - 1)/2 - zero)``
  (T-MAC's bias constant);
- binary-coding quantisation (``bcq``, LUT-GEMM): greedy init ``b_i = sign(residual)``,
  ``alpha_i = mean |residual|``, then rounds of least-squares ``alpha`` and nearest-candidate ``b``;
  ``beta = 0``.

Imported weights keep their own codes and scales (``from_scaled_codes``: GGUF's ``w = scale * code +
offset`` per block of 16 or 32) and also keep ``offset``, the weight at code 0: ``beta`` is rounded
(``offset + scale * (2**bits - 1) / 2``), so only ``offset + scale * code`` (``scale * code`` is
exact at these widths) gives back the file's weights bit for bit. ``dequantize`` uses it when present;
the LUT kernels read ``alpha`` and ``beta`` and agree with it to float rounding.

Storage: ``planes`` int32 ``[bits, out, K_pad / 32]``, bit ``k % 32`` of word ``k // 32`` is column
``k``; ``K_pad`` rounds ``K`` up to whole groups and whole words (padded columns hold bit 0 and meet
zero activations). ``alpha`` ``[out, groups, bits]``, ``beta`` and ``offset`` ``[out, groups]``, float32
as the quantisers make them, or float16 to store (``with_scales``: what ``compress.quantize`` keeps
by default, as GGUF, GPTQ and AWQ files do; every op computes in float32 either way). Groups are
16 columns (GGUF's Q6_K) or a multiple of 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxpress.core.errors import FxpressError

BITS = (2, 3, 4, 5, 6, 8)  # 5, 6 and 8: GGUF's Q5_K, Q6_K and Q8_0 as the files hold them
SCALE_DTYPES = (torch.float32, torch.float16)
BCQ_ROUNDS = 15  # LUT-GEMM's alternating refinements


class QuantizeError(FxpressError, ValueError):
    """Bad bit width, group size or weight shape for low-bit quantisation."""


@dataclass(frozen=True)
class BitPlaneWeight:
    planes: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    in_features: int
    group_size: int
    offset: torch.Tensor | None = None  # [out, groups]: the weight at code 0, for imported uniform codes

    @property
    def bits(self) -> int:
        return self.planes.shape[0]

    def nbytes(self) -> int:
        kept = (self.planes, self.alpha, self.beta) + (() if self.offset is None else (self.offset,))
        return sum(t.numel() * t.element_size() for t in kept)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.planes, self.alpha, self.beta, self.in_features, self.group_size, self.offset)

    def with_scales(self, dtype: torch.dtype) -> "BitPlaneWeight":
        """The same weight with ``alpha``, ``beta`` and ``offset`` stored as ``dtype`` (float16 halves
        their bytes: 4-bit groups of 128 go from 5.25 to 4.63 bits per weight; the rounding, a
        relative 2**-11 of each scale, is far below a 4-bit step)."""
        if dtype not in SCALE_DTYPES:
            raise QuantizeError(f"scale dtype {dtype} is not one of {SCALE_DTYPES}")
        if dtype == torch.float16:
            top = max(float(t.abs().max()) for t in (self.alpha, self.beta) if t.numel())
            if top > torch.finfo(torch.float16).max:
                raise QuantizeError(f"a scale of {top:.3g} does not fit float16: keep float32 scales")
        narrow = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return BitPlaneWeight(self.planes, narrow(self.alpha), narrow(self.beta), self.in_features, self.group_size,
                              narrow(self.offset))


def check_format(bits: int, group_size: int, in_features: int | None = None) -> None:
    if bits not in BITS:
        raise QuantizeError(f"bits={bits!r} is not supported: expected one of {BITS}")
    if not isinstance(group_size, int) or group_size <= 0 or (group_size % 32 and group_size != 16):
        raise QuantizeError(f"group_size={group_size!r} is invalid: expected 16 or a positive multiple of 32 "
                            "(bit-planes are packed 32 columns to a word)")
    if in_features is not None and in_features <= 0:
        raise QuantizeError(f"in_features={in_features} must be positive")


def padded(in_features: int, group_size: int) -> int:
    """Columns stored: whole groups and whole 32-column words."""
    unit = max(group_size, 32)
    return math.ceil(in_features / unit) * unit


def pack(bits_tensor: torch.Tensor) -> torch.Tensor:
    """``[q, out, K_pad]`` of 0/1 -> int32 ``[q, out, K_pad/32]``."""
    q, n, k = bits_tensor.shape
    words = bits_tensor.to(torch.int64).view(q, n, k // 32, 32) << torch.arange(32, dtype=torch.int64)
    packed = words.sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def unpack(planes: torch.Tensor) -> torch.Tensor:
    """int32 ``[q, out, W]`` -> 0/1 int8 ``[q, out, 32 W]``."""
    shifts = torch.arange(32, device=planes.device, dtype=torch.int32)
    return ((planes.unsqueeze(-1) >> shifts) & 1).to(torch.int8).flatten(-2)


def dequantize(planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, in_features: int,
               group_size: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight ``[out, in_features]`` the planes stand for (``offset + scale * code`` when
    the weight kept its offset: one rounding, as the format it came from computes it)."""
    alpha, beta = alpha.to(torch.float32), beta.to(torch.float32)
    if offset is not None:
        offset = offset.to(torch.float32)
        bits = unpack(planes).to(torch.int64)
        codes = sum(bits[i] << i for i in range(bits.shape[0])).to(torch.float32)  # [out, K_pad]
        n, k_pad = codes.shape
        scale = alpha[..., 0] * 2  # alpha_0 = scale / 2: exact
        w = offset.unsqueeze(-1) + scale.unsqueeze(-1) * codes.view(n, k_pad // group_size, group_size)
        return w.reshape(n, k_pad)[:, :in_features]
    signs = unpack(planes).to(torch.float32) * 2 - 1  # [q, out, K_pad]
    q, n, k_pad = signs.shape
    grouped = signs.view(q, n, k_pad // group_size, group_size)
    w = torch.einsum("qngk,ngq->ngk", grouped, alpha) + beta.unsqueeze(-1)
    return w.reshape(n, k_pad)[:, :in_features]


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = weight.shape
    k_pad = padded(k, group_size)
    w = torch.nn.functional.pad(weight.detach().to(torch.float32), (0, k_pad - k))
    return w.view(n, k_pad // group_size, group_size)


def _valid(k: int, group_size: int) -> torch.Tensor:
    """1 for real columns, 0 for padding, shaped ``[groups, group_size]``."""
    k_pad = padded(k, group_size)
    return (torch.arange(k_pad) < k).to(torch.float32).view(k_pad // group_size, group_size)


def rtn(weight: torch.Tensor, bits: int, group_size: int = 128) -> BitPlaneWeight:
    """Uniform asymmetric round-to-nearest per (row, group)."""
    check_format(bits, group_size, weight.shape[1])
    w, valid = _grouped(weight, group_size), _valid(weight.shape[1], group_size)
    big = torch.finfo(torch.float32).max
    lo = torch.where(valid > 0, w, big).amin(-1)
    hi = torch.where(valid > 0, w, -big).amax(-1)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, levels)
    codes = (torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, levels).to(torch.int64)
    return from_codes(codes * valid.to(torch.int64), zero, scale, bits, in_features=weight.shape[1])


def bcq(weight: torch.Tensor, bits: int, group_size: int = 128, rounds: int = BCQ_ROUNDS,
        importance: torch.Tensor | None = None) -> BitPlaneWeight:
    """Binary-coding quantisation with an offset (LUT-GEMM's ``w = sum_i alpha_i s_i + z``),
    refined by alternating least squares from the uniform grid.

    The offset lets BCQ hold any uniform grid exactly, so it starts from round-to-nearest's and
    each round can only lower the weight error: the scales and offset by least squares given the
    signs, then the signs by the nearest of the 2^q values given the scales. Without the offset,
    LUT-GEMM's greedy start clipped each group's largest weights: SmolLM2's perplexity was 66.1
    at 4 bits and 7444 at 3 (RTN 37.5 and 160.5); with it, 38.1 and 118.6.

    ``importance`` (``[in_features]``, e.g. the mean square of each input over calibration data)
    weights each column's squared error in the least squares, so the scales fit the columns the
    layer's output depends on: the error that falls, round by round, is then the output's
    (``sum_j importance_j (w_j - w'_j)^2``). The nearest-value step is the same under any weights."""
    check_format(bits, group_size, weight.shape[1])
    w, valid = _grouped(weight, group_size), _valid(weight.shape[1], group_size)
    n, groups, size = w.shape
    count = valid.sum(-1).clamp(min=1)
    start = rtn(weight, bits, group_size)
    signs_t = (unpack(start.planes).to(torch.float32) * 2 - 1).view(bits, n, groups, size).permute(1, 2, 3, 0)
    alpha, beta = start.alpha, start.beta
    candidates = sign_table(bits)  # [2^q, q]
    ones = torch.ones(n, groups, size, 1)
    weights = valid if importance is None else valid * _column_weights(importance, weight.shape[1], group_size)
    for _ in range(rounds):
        # alpha and z: weighted least squares over the group's real columns,
        # [B 1]^T H [B 1] (alpha, z) = [B 1]^T H w, H the columns' weights (1 without importance)
        b = torch.cat([signs_t, ones], -1) * valid.unsqueeze(-1)
        hb = b * weights.unsqueeze(-1)
        # A small ridge keeps the solve defined when two planes agree on every sign of a group.
        gram = b.transpose(-1, -2) @ hb + (1e-6 * count)[..., None, None] * torch.eye(bits + 1)
        solved = torch.linalg.solve(gram, (hb.transpose(-1, -2) @ w.unsqueeze(-1))).squeeze(-1)
        alpha, beta = solved[..., :bits], solved[..., bits]
        # signs: each weight takes the nearest of the 2^q values the group's alphas and offset make
        values = beta.unsqueeze(-1) + alpha @ candidates.T  # [n, G, 2^q]
        nearest = (w.unsqueeze(-1) - values.unsqueeze(-2)).abs().argmin(-1)  # [n, G, g]
        signs_t = candidates[nearest]
    planes = ((signs_t > 0).to(torch.int64) * valid.unsqueeze(-1).to(torch.int64)).permute(3, 0, 1, 2).flatten(-2)
    return BitPlaneWeight(pack(planes), alpha.contiguous(), beta.contiguous(), weight.shape[1], group_size)


def _column_weights(importance: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """``importance`` as ``[groups, group_size]`` weights of mean 1 over the real columns, each at
    least 1e-3 so a group of inputs that were always zero still has a defined fit."""
    if importance.shape != (in_features,) or not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
        raise QuantizeError(f"importance must be {in_features} finite non-negative values, one per input column; "
                            f"got shape {tuple(importance.shape)}")
    h = importance.detach().to(torch.float32).cpu()
    h = (h / h.mean().clamp(min=1e-30)).clamp(min=1e-3)
    k_pad = padded(in_features, group_size)
    return torch.nn.functional.pad(h, (0, k_pad - in_features)).view(k_pad // group_size, group_size)


def from_codes(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int,
               in_features: int | None = None) -> BitPlaneWeight:
    """Uniform codes ``[out, groups, group_size]`` with ``w = (code - zero) * scale`` (``zero`` and
    ``scale`` ``[out, groups]``) as bit-planes, exactly: ``alpha_i = scale * 2**(i-1)``,
    ``beta = scale * ((2**bits - 1)/2 - zero)``. ``in_features`` (default: every column) leaves
    the last group's padding out."""
    n, groups, group_size = codes.shape
    in_features = groups * group_size if in_features is None else in_features
    check_format(bits, group_size, in_features)
    flat = codes.reshape(n, groups * group_size).to(torch.int64)
    planes = torch.stack([(flat >> i) & 1 for i in range(bits)])
    scale, zero = scale.to(torch.float32), zero.to(torch.float32)
    alpha = torch.stack([scale * 2.0 ** (i - 1) for i in range(bits)], dim=-1)
    return BitPlaneWeight(pack(planes), alpha, scale * ((2 ** bits - 1) / 2 - zero), in_features, group_size)


def from_scaled_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                      in_features: int | None = None) -> BitPlaneWeight:
    """Uniform codes ``[out, groups, group_size]`` of ``w = scale * code + offset`` (``scale`` and
    ``offset`` ``[out, groups]``, float32), the form GGUF's blocks take, as bit-planes that keep
    ``offset`` so ``dequantize`` reproduces ``w`` bit for bit."""
    n, groups, group_size = codes.shape
    in_features = groups * group_size if in_features is None else in_features
    check_format(bits, group_size, in_features)
    if int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits:
        raise QuantizeError(f"codes span {int(codes.min())}..{int(codes.max())}, outside 0..{2 ** bits - 1} "
                            f"for {bits} bits")
    k_pad = padded(in_features, group_size)
    flat = torch.nn.functional.pad(codes.reshape(n, groups * group_size).to(torch.int64),
                                   (0, k_pad - groups * group_size))
    planes = torch.stack([(flat >> i) & 1 for i in range(bits)])
    # Groups of padding columns (a word holds two groups of 16) get zero scales.
    scale, offset = (torch.nn.functional.pad(t.to(torch.float32), (0, k_pad // group_size - groups))
                     for t in (scale, offset))
    alpha = torch.stack([scale * 2.0 ** (i - 1) for i in range(bits)], dim=-1)
    beta = offset + scale * ((2 ** bits - 1) / 2)
    return BitPlaneWeight(pack(planes), alpha, beta, in_features, group_size, offset.contiguous())


def sign_table(bits: int) -> torch.Tensor:
    """``[2^q, q]``: row p holds the signs 2 * bit_i(p) - 1."""
    p = torch.arange(2 ** bits).unsqueeze(-1)
    return ((p >> torch.arange(bits)) & 1).to(torch.float32) * 2 - 1
