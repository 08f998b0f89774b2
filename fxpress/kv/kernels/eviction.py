"""Triton kernel of H2O's decode-step bookkeeping (``fxpress/kv/stores.py``'s HeavyHitterStore is
its reference): one program per (sequence, KV head) of a full store adds this step's attention
to every slot's score, picks the lowest-scored slot outside the recent window (first on ties, as
``torch.argmin``), and writes the new token's key, value, position and score there. One launch
replaces six torch kernels and never reads more than the slot's metadata and one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _h2o_decode_kernel(score, position, mass, keys, values, k_new, v_new, slots, oldest_recent, new_position,
                       D: tl.constexpr, SLOTS_PAD: tl.constexpr):
    seq = tl.program_id(0)
    at = tl.arange(0, SLOTS_PAD)
    ok = at < slots
    s = tl.load(score + seq * slots + at, mask=ok, other=0.0) + tl.load(mass + seq * (slots + 1) + at, mask=ok,
                                                                         other=0.0)
    tl.store(score + seq * slots + at, s, mask=ok)
    pos = tl.load(position + seq * slots + at, mask=ok, other=0)
    priority = tl.where(ok & (pos < oldest_recent), s, float("inf"))
    victim = tl.argmin(priority, 0)
    ch = tl.arange(0, D)
    tl.store(keys + (seq * slots + victim) * D + ch, tl.load(k_new + seq * D + ch))
    tl.store(values + (seq * slots + victim) * D + ch, tl.load(v_new + seq * D + ch))
    tl.store(position + seq * slots + victim, new_position)
    tl.store(score + seq * slots + victim, tl.load(mass + seq * (slots + 1) + slots))


def h2o_decode_update(score: torch.Tensor, position: torch.Tensor, mass: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, seen: int, recent: int) -> None:
    """In place, on a full store: ``score, position [B, H, C]``, ``mass [B, H, C + 1]`` (the new
    token's last), ``keys, values [B, H, C, d]``, the new ``k, v [B, H, 1, d]``."""
    b, h, slots, d = keys.shape
    for name, t in (("score", score), ("position", position), ("keys", keys), ("values", values)):
        if not t.is_contiguous():
            raise ValueError(f"h2o_decode_update: {name} must be contiguous")
    _h2o_decode_kernel[(b * h,)](score, position, mass.contiguous(), keys, values,
                                 k_new.to(keys.dtype).contiguous(), v_new.to(values.dtype).contiguous(), slots,
                                 seen + 1 - recent, seen, D=d, SLOTS_PAD=triton.next_power_of_2(slots))
