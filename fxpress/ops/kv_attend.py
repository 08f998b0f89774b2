"""``fxpress::kv_attend``: attention of a chunk's queries over compressed KV state plus the chunk.

    kv_attend(q [B, Hq, T, d], k [B, Hkv, T, d], v [B, Hkv, T, d], positions [T], mask?, owner,
              handle, scale) -> [B, Hq, T, d]

The queries see every token the state holds and the chunk causally; the chunk is then appended
to the state (``fxpress.kv.graph_state``): the sequence that the model's key buffer ``owner``
owns, at the rewritten layer ``handle``. The op is *stateful*: two calls with the same arguments
differ, so passes must never merge or drop one (the output is always used).
"""

from __future__ import annotations

import torch

from fxpress.ops._define import define_op


def _kv_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None, owner: torch.Tensor, handle: int, scale: float) -> torch.Tensor:
    from fxpress.kv.graph_state import state

    return state(handle).attend(q, k, v, positions, mask, owner, scale)


def _fake(q, k, v, positions, mask, owner, handle, scale):
    return q.new_empty(q.shape)


kv_attend = define_op("kv_attend", _kv_attend, _fake, state_handle=6)
