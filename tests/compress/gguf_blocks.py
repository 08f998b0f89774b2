"""Test data: real weights written as GGUF k-quant blocks (Q4_K, Q5_K, Q6_K), which the gguf package
can read but not write. A plain min/max quantiser lays each 256-weight super-block out as
llama.cpp's ``ggml-quants.c`` does (the layout ``gguf.quants`` decodes); the tests check that the
package decodes these blocks back to about the weights before they check fxpress's import of them."""

from __future__ import annotations

import numpy as np


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _six_bit_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """[blocks, 8] six-bit scales and mins -> the 12 bytes ``Q4_K.get_scale_min`` unpacks."""
    out = np.zeros((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _asymmetric(weights: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per 32-weight sub-block: six-bit scales and mins under fp16 super-block d and dmin, and codes."""
    blocks = weights.reshape(-1, 8, 32).astype(np.float32)
    low, high = blocks.min(-1), blocks.max(-1)
    scale, minimum = (high - low) / levels, np.maximum(-low, 0)
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (minimum.max(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d == 0, 1, d)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(minimum / np.where(dmin == 0, 1, dmin)[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[..., None]
    codes = np.rint((blocks + (dmin[:, None] * m)[..., None]) / np.where(step == 0, 1, step))
    return d, dmin, sc, m, np.clip(codes, 0, levels).astype(np.uint8)


def q4_k(weights: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _asymmetric(weights, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(len(q), 128)  # byte c*32+i: sub-blocks 2c, 2c+1
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _six_bit_scales(sc, m), qs], axis=1)


def q5_k(weights: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _asymmetric(weights, 31)
    low = q & 0x0F
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(len(q), 128)
    qh = sum(((q[:, j] >> 4) & 1) << j for j in range(8)).astype(np.uint8)  # bit j: sub-block j
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _six_bit_scales(sc, m), qh, qs], axis=1)


def q6_k(weights: np.ndarray) -> np.ndarray:
    blocks = weights.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(blocks).max(-1) / 32
    d = (scale.max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d == 0, 1, d)[:, None]), -128, 127).astype(np.int8)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.rint(blocks / np.where(step == 0, 1, step)) + 32, 0, 63).astype(np.uint8).reshape(-1, 256)
    # Weight h*128 + n*64 + i: low bits in byte h*64 + i (nibble n); weight h*128 + s*32 + i: high
    # bits in byte h*32 + i (bits 2s, 2s+1).
    halves = q.reshape(-1, 2, 128)
    ql = (halves[:, :, :64] & 0x0F) | ((halves[:, :, 64:] & 0x0F) << 4)
    high = (halves >> 4).reshape(-1, 2, 4, 32)
    qh = sum(high[:, :, s] << (2 * s) for s in range(4)).astype(np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _fp16_bytes(d)], axis=1)


WRITERS = {"Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
