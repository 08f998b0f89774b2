"""Kernels of the KV stores: Triton on CUDA (KIVI quantisation and split decode attention, H2O's fused
eviction step), C++ on the CPU (KIVI decode attention). Imported lazily by the stores that use them."""

from __future__ import annotations

import torch


def decode_step(q: torch.Tensor, k_new: torch.Tensor, group_size: int, tokens_per_split: int
                ) -> tuple[int, int, int, int, int]:
    """``(batch, query heads, KV heads, head dim, tokens per split)`` of one decode step, the split a
    whole number of key groups; refused unless there is one query token and whole query groups."""
    b, hq, t, d = q.shape
    hkv = k_new.shape[1]
    if t != 1 or hq % hkv:
        raise ValueError(f"decode_attention takes one query token per sequence and whole query groups; got q "
                         f"{tuple(q.shape)}, k {tuple(k_new.shape)}")
    return b, hq, hkv, d, max(tokens_per_split // group_size, 1) * group_size
