"""KIVI decode attention on the CPU (``kivi.cpp``): the counterpart of ``decode_attention`` in
``kivi.py`` (Triton, CUDA), with the same arguments. The store calls it for one-token decode steps
on CPU tensors when a C++ compiler works (``fxpress.native.build``); otherwise, and for prefill,
the reference attention runs."""

from __future__ import annotations

import ctypes
import functools

import torch

import fxpress.kv.rope_frame as rope_frame
from fxpress.kv.kernels import decode_step
from fxpress.native import build
from fxpress.native.kernels import INT, LONG, POINTER, library_beside, threads

TOKENS_PER_SPLIT = 1024  # quantised tokens per work item
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

@functools.cache
def _lib() -> ctypes.CDLL:
    return library_beside(__file__, "kivi", {"fxpress_kivi_decode": (
        None, [POINTER, POINTER, LONG] + [POINTER] * 12 + [INT] + [LONG] * 5 + [INT] + [LONG] * 9
        + [POINTER, POINTER, LONG]  # rope_cos, rope_sin, rope_stride
        + [POINTER, INT])})


def refusal(store) -> str | None:
    """Why the C++ kernel cannot run this store's decode steps here, or None."""
    if store.dtype not in _DTYPES:
        return f"a KIVI store of {store.dtype}"
    return build.compiler_refusal()


def decode_attention(q: torch.Tensor, store, k_new: torch.Tensor, v_new: torch.Tensor, scale: float,
                     tokens_per_split: int = TOKENS_PER_SPLIT) -> torch.Tensor:
    """``q [B, Hq, 1, d]``, the new ``k, v [B, Hkv, 1, d]`` -> float32 ``[B, Hq, 1, d]``."""
    policy = store.policy
    g = policy.group_size
    b, hq, hkv, d, tokens_per_split = decode_step(q, k_new, g, tokens_per_split)
    qs = (q.reshape(b, hq, d).to(torch.float32) * scale).contiguous()
    k1 = k_new.reshape(b, hkv, d).to(torch.float32).contiguous()
    v1 = v_new.reshape(b, hkv, d).to(torch.float32).contiguous()
    out = torch.empty(b, hq, d, dtype=torch.float32)
    s = store
    q_keys, kd = qs, d
    if s.pruner is not None and s.pruner.channels is not None:  # ThinK: the query's kept channels
        q_keys, kd = s.pruner.queries(qs), s.pruner.kept
    cos = sin = None
    if policy.rope_theta is not None:  # pre-RoPE keys: the kernel turns them as it reads them
        cos, sin = rope_frame.cos_sin(policy.rope_theta, d, max(s.sunk + s.quantised, g), q.device)
    _lib().fxpress_kivi_decode(
        qs.data_ptr(), q_keys.data_ptr(), kd, s.k_codes.data_ptr(), s.k_scale.data_ptr(), s.k_lo.data_ptr(),
        s.v_codes.data_ptr(), s.v_scale.data_ptr(), s.v_lo.data_ptr(), s.k_residual.data_ptr(), s.v_residual.data_ptr(),
        s.k_sink.data_ptr(), s.v_sink.data_ptr(), k1.data_ptr(), v1.data_ptr(), _DTYPES[s.dtype], b, hkv, hq // hkv,
        d, g, policy.bits, s.quantised, s.k_codes.shape[2], s.k_scale.shape[2], s.v_codes.shape[2], s.waiting,
        s.k_residual.shape[2], s.sunk, s.k_sink.shape[2], tokens_per_split, None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(), 0 if cos is None else cos.shape[1], out.data_ptr(), threads())
    return out.reshape(b, hq, 1, d)
