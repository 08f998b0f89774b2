"""Keys as they were before the rotary embedding (KVQuant's pre-RoPE key quantisation).

A model with rotary position embeddings turns the key of the token at position ``t`` by angles
``t * theta^(-2j/d)``, channel ``j`` paired with ``j + d/2`` (Llama's ``rotate_half``). The keys'
per-channel structure (a few channels large for every token) is clearest before that turn: after
it, each pair's energy swings between its two channels from one token to the next, and a
per-channel range over a group of tokens has to cover both. So a store quantises ``unrope(k, t)``
and turns the dequantised key back by the same angles before attention reads it.

Turning back by the very angles used to turn in is the identity up to float rounding, whatever
``theta`` is: a ``theta`` that is not the model's (or a model whose rotary embedding is laid out
otherwise) only quantises in a less helpful frame, never changes what attention computes.

The cos/sin tables are constants of ``(theta, d, device)``, like a weight: one table per process,
grown to the longest position asked for and shared by every layer and every cache.
"""

from __future__ import annotations

import threading

import torch

_TABLES: dict[tuple[float, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_LOCK = threading.Lock()


def _angles(theta: float, d: int, positions: int) -> torch.Tensor:
    """``[positions, d/2]`` float32 angles, computed as transformers' rotary embedding does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    return torch.arange(positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]


def cos_sin(theta: float, d: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos, sin [d/2, >= stop]``, contiguous, channel-major (a kernel reads one channel's
    angles for consecutive tokens), of positions ``0 .. stop - 1`` and on: a shared table, to be
    read, never written."""
    key = (float(theta), d, torch.device(device))
    table = _TABLES.get(key)
    if table is None or table[0].shape[1] < stop:
        with _LOCK:
            table = _TABLES.get(key)
            if table is None or table[0].shape[1] < stop:
                size = max(1024, 1 << (stop - 1).bit_length())
                angles = _angles(theta, d, size)
                table = _TABLES[key] = tuple(f(angles).T.contiguous().to(key[2]) for f in (torch.cos, torch.sin))
    return table


def turn(k: torch.Tensor, theta: float, start: int, inverse: bool) -> torch.Tensor:
    """Keys ``[B, H, n, d]`` at positions ``start .. start + n - 1`` turned by their rotary angles
    (``inverse``: back, to the frame before the embedding), in float32."""
    n, d = k.shape[2], k.shape[3]
    cos, sin = cos_sin(theta, d, start + n, k.device)
    cos, sin = cos[:, start:start + n].T, sin[:, start:start + n].T
    if inverse:
        sin = -sin
    k = k.float()
    x1, x2 = k[..., :d // 2], k[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
