"""SDPA on the cpp target (``dense_attention.cpp``): what ``aten._scaled_dot_product_flash_attention_for_cpu``
computes, for float32 q, k, v read through their strides and written into the kernel's planned
output slot. The cpp target (``fxpress/codegen/targets/cpp/attention.py``) decides which SDPA
calls it runs; this module only launches the kernel."""

from __future__ import annotations

import ctypes
import functools

import torch

from fxpress.native.kernels import FLOAT, INT, LONG, POINTER, library_beside, pointer, threads
from fxpress.ops.cpp.lowrank import ATTENTION_HEADERS, additive_mask


@functools.cache
def _lib():
    return library_beside(__file__, "dense_attention", {"fxpress_dense_attention": (
        None, [POINTER, POINTER] * 3 + [LONG] * 7 + [POINTER, POINTER, INT, FLOAT, POINTER, POINTER, INT])},
        headers=ATTENTION_HEADERS)


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 4)(*t.stride())


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                    is_causal: bool, scale: float | None, out: torch.Tensor) -> torch.Tensor:
    """out[b, h] = softmax(query[b, h] . key[b, g]^T * scale + mask) . value[b, g], g = h // (heads /
    kv_heads); all four tensors 4-D float32 on the CPU, any strides."""
    (batch, heads, seq, d), (kv_heads, seq_k), dv = query.shape, key.shape[1:3], value.shape[-1]
    mask = additive_mask(attn_mask, (batch, heads, seq, seq_k))
    _lib().fxpress_dense_attention(
        query.data_ptr(), _strides(query), key.data_ptr(), _strides(key), value.data_ptr(), _strides(value),
        batch, heads, kv_heads, seq, seq_k, d, dv, pointer(mask),
        _strides(mask) if mask is not None else (ctypes.c_int64 * 4)(), int(is_causal),
        d ** -0.5 if scale is None else scale, out.data_ptr(), _strides(out), threads())
    return out
