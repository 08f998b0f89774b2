"""Reference attention over a compressed store plus the new chunk: the definition of correct.

Queries of the chunk see every stored token (all earlier) and the chunk's own keys causally. The
stored part arrives one dequantised segment at a time and is folded in with an online softmax, so
no dequantised copy of the cache is ever whole. Query rows go in blocks to bound the score tiles.

``store`` is a ``fxpress.kv.stores.Store`` (which imports this module, not the reverse).

Grouped-query attention is native: the ``G`` query heads of a KV head are stacked as extra query
rows of that head, so K/V are never repeated.

For stores that score tokens by attention (H2O), a second pass with the final log-sum-exp adds up
each key's attention probability over every query of the call and every query head of its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fxpress.core.errors import KVCacheError

QUERY_ROWS = 256  # query rows per score tile: bounded temporaries for long chunks


@dataclass(frozen=True)
class ScoreRule:
    """What a model does to attention scores besides scaling them: logit soft-capping
    (``softcap * tanh(s / softcap)``, Gemma 2) and a sliding window (a query at position ``p`` sees
    keys at positions ``> p - window``: Mistral, Gemma 2/3's local layers)."""

    softcap: float | None = None
    window: int | None = None

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.window is None


PLAIN = ScoreRule()


def _check_window(store: Any, rule: ScoreRule, t: int) -> None:
    """A window needs each stored token's position: stores that keep every token in order have it
    (position = index); an evicting store's order is its own, so the window must not bind there."""
    if rule.window is None or store.keeps_positions or store.filled + t <= rule.window:
        return
    raise KVCacheError(f"a sliding-window layer (window {rule.window}) reached {store.filled + t} tokens with a "
                       f"{type(store).__name__}, which does not keep token positions in order: use FullKV or "
                       "KIVI for sliding-window models, or a cache no longer than the window")


def attend(store: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           rule: ScoreRule = PLAIN) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q [B, Hq, T, d]``, the chunk's ``k, v [B, Hkv, T, d]`` -> (output ``[B, Hq, T, d]`` float32,
    per-key attention mass ``[B, Hkv, stored + T]`` when the store needs it). The store decides how
    (``Store.attend``): this reference, or a kernel of its own."""
    return store.attend(q, k, v, scale, rule)


def reference_attend(store: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     rule: ScoreRule = PLAIN) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`attend` in plain torch, over the store's dequantised segments."""
    _check_window(store, rule, q.shape[2])
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads")
    # Row r of a KV head is query (g, i) of its group, g = r // t, i = r % t.
    qg = (q.float() * scale).reshape(b, hkv, hq // hkv * t, d)
    row_pos = torch.arange(t, device=q.device).repeat(hq // hkv)
    kf, vf = k.float(), v.float()
    m = torch.full((b, hkv, qg.shape[2], 1), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros_like(qg)
    # Each stored segment is dequantised once and met by every block of query rows.
    for _, rows, s, vb in _score_tiles(store, qg, kf, vf, row_pos, rule):
        m_new = torch.maximum(m[:, :, rows], s.amax(-1, keepdim=True))
        # A row the window has hidden every key from so far keeps max -inf: subtract 0 there.
        shift = torch.where(torch.isinf(m_new), 0.0, m_new)
        p = torch.exp(s - shift)
        correction = torch.exp(m[:, :, rows] - shift)
        l[:, :, rows] = l[:, :, rows] * correction + p.sum(-1, keepdim=True)
        acc[:, :, rows] = acc[:, :, rows] * correction + p @ vb
        m[:, :, rows] = m_new
    out = (acc / l).reshape(b, hq, t, d)
    if not store.needs_mass:
        return out, None
    # Second pass with each row's final log-sum-exp: every key's probability, summed over rows.
    lse = m + l.log()
    mass = torch.zeros(b, hkv, store.filled + t, device=q.device)
    for at, rows, s, _ in _score_tiles(store, qg, kf, vf, row_pos, rule):
        mass[:, :, at: at + s.shape[-1]] += (s - lse[:, :, rows]).exp().sum(2)
    return out, mass


def _score_tiles(store: Any, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_pos: torch.Tensor,
                 rule: ScoreRule = PLAIN):
    """(key offset, row slice, scores, V) tiles: every stored segment (visible to all rows), then the
    chunk's own keys (causal: row ``r`` sees keys up to ``row_pos[r]``), over blocks of query rows.
    With a window, key offsets are token positions (``_check_window``) and older keys are hidden."""
    blocks = [slice(r, min(r + QUERY_ROWS, qg.shape[2])) for r in range(0, qg.shape[2], QUERY_ROWS)]
    at = 0
    filled = store.filled

    def ruled(s: torch.Tensor, rows: slice, first_key: int) -> torch.Tensor:
        if rule.softcap is not None:
            s = torch.tanh(s / rule.softcap) * rule.softcap
        if rule.window is not None:
            keys = first_key + torch.arange(s.shape[-1], device=s.device)
            s = s.masked_fill(keys[None, :] <= (filled + row_pos[rows])[:, None] - rule.window, float("-inf"))
        return s

    for kb, vb in store.segments():
        for rows in blocks:
            yield at, rows, ruled(qg[:, :, rows] @ kb.transpose(-1, -2), rows, at), vb
        at += kb.shape[2]
    t = k.shape[2]
    for rows in blocks:
        pos = row_pos[rows]
        # The latest query in the block (rows wrap around t); later keys are in every row's future.
        wraps = rows.stop - rows.start >= t or rows.start % t > (rows.stop - 1) % t
        stop = t if wraps else (rows.stop - 1) % t + 1
        s = ruled(qg[:, :, rows] @ k[:, :, :stop].transpose(-1, -2), rows, filled)
        visible = torch.arange(stop, device=k.device)[None, :] <= pos[:, None]
        yield at, rows, s.masked_fill(~visible, float("-inf")), v[:, :, :stop]
