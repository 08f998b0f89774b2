"""Reference attention over a compressed store plus the new chunk: the definition of correct.

Queries of the chunk see every stored token (all earlier) and the chunk's own keys causally. The
stored part arrives one dequantised segment at a time and is folded in with an online softmax, so
no dequantised copy of the cache is ever whole. Queries go in blocks to bound the score tiles.

Grouped-query attention is native: the ``G`` query heads of a KV head are stacked as extra query
rows of that head, so K/V are never repeated.

For stores that score tokens by attention (H2O), a second pass with the final log-sum-exp adds up
each key's attention probability over every query of the call and every query head of its group.
"""

from __future__ import annotations

import torch

from fxpress.kv.stores import DuoStore, KIVIStore, Store

QUERY_BLOCK = 256


def attend(store: Store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q [B, Hq, T, d]``, the chunk's ``k, v [B, Hkv, T, d]`` -> (output ``[B, Hq, T, d]`` float32,
    per-key attention mass ``[B, Hkv, stored + T]`` when the store needs it)."""
    if isinstance(store, DuoStore):
        return _attend_duo(store, q, k, v, scale), None
    if isinstance(store, KIVIStore) and q.is_cuda and q.shape[2] == 1:
        from fxpress.codegen.kernels import kivi  # decode reads the packed codes in place

        return kivi.decode_attention(q, store, k, v, scale), None
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads")
    group = hq // hkv
    # Row r of a head is query (g, i) with g = r // t, i = r % t.
    qg = (q.float() * scale).reshape(b, hkv, group * t, d)
    row_pos = torch.arange(t, device=q.device).repeat(group)
    kf, vf = k.float(), v.float()
    out = torch.empty(b, hkv, group * t, d, dtype=torch.float32, device=q.device)
    mass = torch.zeros(b, hkv, store.filled + t, device=q.device) if store.needs_mass else None
    for start in range(0, t, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, t)
        index = ((row_pos >= start) & (row_pos < stop)).nonzero().squeeze(1)
        qb, pos = qg.index_select(2, index), row_pos[index]
        m = torch.full((b, hkv, len(index), 1), float("-inf"), device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(b, hkv, len(index), d, device=q.device)
        for _, kb, vb, mask in _key_blocks(store, kf, vf, pos, stop):
            s = _scores(qb, kb, mask)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            correction = torch.exp(m - m_new)
            l = l * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + p @ vb
            m = m_new
        out.index_copy_(2, index, acc / l)
        if mass is not None:
            # Second pass with the rows' final log-sum-exp: each key's probability, summed.
            lse = m + l.log()
            for at, kb, _, mask in _key_blocks(store, kf, vf, pos, stop):
                mass[:, :, at: at + kb.shape[2]] += (_scores(qb, kb, mask) - lse).exp().sum(2)
    return out.reshape(b, hq, t, d), mass


def _scores(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    s = q @ k.transpose(-1, -2)
    return s if visible is None else s.masked_fill(~visible, float("-inf"))


def _key_blocks(store: Store, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor, stop: int):
    """(offset, K, V, visibility or None): the stored segments, then the chunk's first ``stop`` keys
    (later ones are in every query's future)."""
    at = 0
    for kb, vb in store.segments():
        yield at, kb, vb, None
        at += kb.shape[2]
    key_pos = torch.arange(stop, device=k.device)
    yield at, k[:, :, :stop], v[:, :, :stop], key_pos[None, :] <= query_pos[:, None]


def _attend_duo(store: DuoStore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    grouped = q.reshape(b, hkv, hq // hkv, t, d)
    out = torch.empty(b, hkv, hq // hkv, t, d, dtype=torch.float32, device=q.device)
    for heads, part in store.parts:
        sub_q = grouped.index_select(1, heads).flatten(1, 2)
        sub_out, _ = attend(part, sub_q, k.index_select(1, heads), v.index_select(1, heads), scale)
        out.index_copy_(1, heads, sub_out.unflatten(1, (len(heads), -1)))
    return out.reshape(b, hq, t, d)
