"""The KV quantiser: asymmetric min-max over groups, codes packed 32/bits to an int32 word.

For a group g: ``scale = (max g - min g) / (2^bits - 1)``, ``q = clamp(round((x - min) / scale))``,
``x ~ q * scale + min``. Scale and min are rounded to the storage dtype *before* the codes are
computed, so dequantisation uses exactly the numbers the codes were made with. A constant group
(scale 0) gets code 0 and dequantises to its min, exactly.

With ``clip=True`` the group's range is also tried shrunk about its middle by each of
``CLIP_RATIOS``, and the one with the least squared error over the group kept (KIVI's keys use
this: 2-bit key groups are dominated by their extremes).

Packing puts code ``i`` of a word at bits ``[i*bits, (i+1)*bits)``; words are int32 and may be
negative, which the unpacking mask takes care of.
"""

from __future__ import annotations

import torch


CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)


def codes_per_word(bits: int) -> int:
    return 32 // bits


def _quantize_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype):
    lo = lo.to(dtype)
    scale = ((hi - lo.float()) / (2**bits - 1)).to(dtype)
    s, m = scale.float(), lo.float()
    q = torch.where(s > 0, (x - m) / torch.where(s > 0, s, 1.0), 0.0)
    return q.round().clamp(0, 2**bits - 1).to(torch.int32), scale, lo


def quantize(x: torch.Tensor, bits: int, group_dim: int, dtype: torch.dtype, clip: bool = False
             ) -> tuple[torch.Tensor, ...]:
    """Quantise over ``group_dim`` (the axis a group spans, already split out by the caller).
    Returns int32 codes shaped like ``x`` and (scale, min) in ``dtype`` with ``group_dim`` kept as 1."""
    x = x.float()
    lo, hi = x.amin(group_dim, keepdim=True), x.amax(group_dim, keepdim=True)
    if not clip:
        return _quantize_range(x, lo, hi, bits, dtype)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = best_error = None
    for ratio in CLIP_RATIOS:
        found = _quantize_range(x, mid - ratio * half, mid + ratio * half, bits, dtype)
        error = ((dequantize(*found) - x) ** 2).sum(group_dim, keepdim=True)
        if best is None:
            best, best_error = list(found), error
            continue
        better = error < best_error  # ties keep the wider range
        best = [torch.where(better, new, old) for new, old in zip(found, best)]
        best_error = torch.where(better, error, best_error)
    return tuple(best)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + lo.float()


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack int32 codes along ``dim`` (its size a multiple of 32/bits) into int32 words."""
    per = codes_per_word(bits)
    dim = dim % codes.dim()
    n = codes.shape[dim]
    if n % per:
        raise ValueError(f"cannot pack {n} codes along dim {dim} into words of {per}")
    split = codes.unflatten(dim, (n // per, per))
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int32) * bits).view(
        (per,) + (1,) * (codes.dim() - dim - 1))
    # Shifting into the sign bit wraps in int32, which is the two's-complement word we want.
    return (split << shifts).sum(dim + 1, dtype=torch.int32)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 codes, ``32/bits`` per word along ``dim``."""
    per = codes_per_word(bits)
    dim = dim % words.dim()
    shifts = (torch.arange(per, device=words.device, dtype=torch.int32) * bits).view(
        (per,) + (1,) * (words.dim() - dim - 1))
    codes = (words.unsqueeze(dim + 1) >> shifts) & (2**bits - 1)
    return codes.flatten(dim, dim + 1)
