"""GGUF's quantised tensors as fxpress bit-planes, exactly, decoded by the ``gguf`` package itself.

Every supported block type stores, per block of 16 or 32 weights, ``w = scale * code + offset`` with
integer codes (llama.cpp's ``ggml-quants.c``, which ``gguf.quants`` mirrors in numpy):

| type | block | codes | scale | offset |
|---|---|---|---|---|
| Q4_0 | 32 | 4-bit, ``w = d (q - 8)`` | d | -8 d |
| Q4_1 | 32 | 4-bit, ``w = d q + m`` | d | m |
| Q8_0 | 32 | int8 ``x`` as ``x + 128`` | d | -128 d |
| Q4_K, Q5_K | 32 of a 256 super-block | 4 / 5-bit, ``w = d sc q - dmin m`` | d sc | -dmin m |
| Q6_K | 16 of a 256 super-block | 6-bit, ``w = d sc (q - 32)`` | d sc | -32 d sc |

The fp16 ``d`` (and ``dmin``) times a small integer is exact in fp32, so ``scale * code`` is exact and
``offset + scale * code`` rounds once, where gguf's own dequantisation rounds: the imported weights
equal the package's bit for bit (zeros aside, whose sign may differ). The super-block scales are
kept as they are, one per sub-block.

The codes come from the package's own decoder, not from re-implementing each bit layout: a copy of
the blocks with ``d = 1`` and ``dmin``, ``m`` = 0 dequantises to the codes themselves (times the
sub-block scale ``sc`` for the k-quants, which ``gguf.quants.Q4_K.get_scale_min`` and the int8
Q6_K scales give). Only the fp16 header fields are read here, at the offsets the format fixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fxpress import lowbit

ONE, ZERO = np.float16(1.0), np.float16(0.0)


@dataclass(frozen=True)
class Decoded:
    """Codes ``[blocks, groups, group]`` and float32 ``scale``, ``offset`` ``[blocks, groups]``."""

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    bits: int


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of every block, as float32 ``[blocks, 1]``."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _with_fp16(blocks: np.ndarray, **fields: np.float16) -> np.ndarray:
    """A copy of the blocks with fp16 fields (``at_<byte offset>=value``) overwritten."""
    out = blocks.copy()
    for name, value in fields.items():
        at = int(name.removeprefix("at_"))
        out[:, at:at + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return out


def _codes_over(values: np.ndarray, sub_scales: np.ndarray, shift: int) -> np.ndarray:
    """Integer codes from ``values = sub_scale * (code - shift)`` per sub-block; a sub-block whose scale
    is 0 holds no information and gets code ``shift`` (its weights are the offset alone)."""
    safe = np.where(sub_scales == 0, 1, sub_scales)
    codes = np.rint(values / safe[..., None]).astype(np.int64) + shift
    return np.where(sub_scales[..., None] == 0, shift, codes)


def _q4_0(blocks: np.ndarray) -> Decoded:
    from gguf.quants import Q4_0

    d = _fp16(blocks, 0)
    codes = Q4_0.dequantize_blocks(_with_fp16(blocks, at_0=ONE)).astype(np.int64) + 8  # q - 8
    return Decoded(codes[:, None, :], d, -8 * d, 4)


def _q4_1(blocks: np.ndarray) -> Decoded:
    from gguf.quants import Q4_1

    d, m = _fp16(blocks, 0), _fp16(blocks, 2)
    codes = Q4_1.dequantize_blocks(_with_fp16(blocks, at_0=ONE, at_2=ZERO)).astype(np.int64)
    return Decoded(codes[:, None, :], d, m, 4)


def _q8_0(blocks: np.ndarray) -> Decoded:
    from gguf.quants import Q8_0

    d = _fp16(blocks, 0)
    codes = Q8_0.dequantize_blocks(_with_fp16(blocks, at_0=ONE)).astype(np.int64) + 128  # int8 x
    return Decoded(codes[:, None, :], d, -128 * d, 8)


def _k_quant(kind: str, bits: int) -> Callable[[np.ndarray], Decoded]:
    """Q4_K and Q5_K: [d, dmin, 12 bytes of 6-bit sc and m, codes]; 8 sub-blocks of 32."""

    def decode(blocks: np.ndarray) -> Decoded:
        from gguf import quants

        d, dmin = _fp16(blocks, 0), _fp16(blocks, 2)
        sc, m = (t.astype(np.float32) for t in quants.Q4_K.get_scale_min(blocks[:, 4:16].copy()))
        values = getattr(quants, kind).dequantize_blocks(_with_fp16(blocks, at_0=ONE, at_2=ZERO))
        codes = _codes_over(values.reshape(len(blocks), 8, 32), sc, 0)
        return Decoded(codes, d * sc, -(dmin * m), bits)
    return decode


def _q6_k(blocks: np.ndarray) -> Decoded:
    """[128 bytes low bits, 64 bytes high bits, 16 int8 sc, d]; 16 sub-blocks of 16, ``q - 32``."""
    from gguf.quants import Q6_K

    d = _fp16(blocks, 208)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    values = Q6_K.dequantize_blocks(_with_fp16(blocks, at_208=ONE)).reshape(len(blocks), 16, 16)
    scale = d * sc
    return Decoded(_codes_over(values, sc, 32), scale, -32 * scale, 6)


DECODERS: dict[str, Callable[[np.ndarray], Decoded]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _k_quant("Q4_K", 4), "Q5_K": _k_quant("Q5_K", 5),
    "Q6_K": _q6_k}


def scaled_codes(data: np.ndarray, type_name: str, rows: int, columns: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The codes ``[rows, groups, group]``, ``scale`` and ``offset`` ``[rows, groups]`` and the bit
    width of the ``[rows, columns]`` weight a GGUF tensor of ``type_name`` holds (``data``: its raw
    bytes, as ``gguf.GGUFReader`` gives them)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name not in DECODERS:
        raise lowbit.QuantizeError(f"GGUF type {type_name} is not imported (supported: {sorted(DECODERS)})")
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if columns % block_size or data.size != rows * columns // block_size * type_size:
        raise lowbit.QuantizeError(f"GGUF {type_name} tensor of {data.size} bytes is not [{rows}, {columns}] "
                                   f"in blocks of {block_size} weights / {type_size} bytes")
    decoded = DECODERS[type_name](np.ascontiguousarray(data).view(np.uint8).reshape(-1, type_size))
    groups_per_block, group = decoded.codes.shape[1:]
    groups = columns // block_size * groups_per_block
    codes = torch.from_numpy(decoded.codes).reshape(rows, groups, group)
    scale, offset = (torch.from_numpy(np.ascontiguousarray(t)).reshape(rows, groups)
                     for t in (decoded.scale, decoded.offset))
    return codes, scale, offset, decoded.bits


def bit_planes(data: np.ndarray, type_name: str, rows: int, columns: int) -> lowbit.BitPlaneWeight:
    """The tensor as exact bit-planes (``lowbit.from_scaled_codes``)."""
    codes, scale, offset, bits = scaled_codes(data, type_name, rows, columns)
    return lowbit.from_scaled_codes(codes, scale, offset, bits, in_features=columns)


def reference_weights(data: np.ndarray, type_name: str, rows: int, columns: int) -> torch.Tensor:
    """The package's own float32 dequantisation of the same tensor: what ``bit_planes`` must equal."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1), GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(rows, columns)
