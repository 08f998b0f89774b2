"""ThinK's choice of key channels (``fxpress.kv.think``), shared by its own store and KIVI's:
scored once from the latest queries and the keys seen, then a gather of each key's kept channels."""

from __future__ import annotations

import torch


class ChannelPruner:
    """Which key channels of each (sequence, KV head) to keep: the mean square of the latest
    ``window`` queries (kept as they arrive, per KV head) times the keys' mean square, best first."""

    def __init__(self, kept: int, window: int, batch: int, heads: int, head_dim: int, device: torch.device) -> None:
        self.kept, self.window = kept, window
        self.query_squares = torch.zeros(batch, heads, window, head_dim, device=device)
        self.queries_seen = 0
        self.channels: torch.Tensor | None = None  # [B, H, kept] int64, ascending, once chosen

    def nbytes(self) -> int:
        held = 0 if self.channels is None else self.channels.numel() * 4  # an int32 index suffices
        return held + (self.query_squares.nbytes if self.channels is None else 0)

    def observe(self, q: torch.Tensor) -> None:
        """Remember the latest queries ``q [B, Hq, T, d]`` (until the channels are chosen)."""
        if self.channels is not None:
            return
        b, hq, t, d = q.shape
        heads = self.query_squares.shape[1]
        squares = q.float().square().reshape(b, heads, hq // heads, t, d).mean(2)[:, :, -self.window:]
        for token in squares.unbind(2):  # a ring of the latest `window` queries
            self.query_squares[:, :, self.queries_seen % self.window] = token
            self.queries_seen += 1

    def choose(self, keys: torch.Tensor) -> torch.Tensor:
        """Pick the channels from ``keys [B, H, n, d]`` (every key seen so far) and the queries."""
        if self.channels is None:
            seen = min(self.queries_seen, self.window)
            query = self.query_squares[:, :, :seen].mean(2) if seen else torch.ones_like(self.query_squares[:, :, 0])
            score = query * keys.float().square().mean(2)
            self.channels = score.topk(self.kept, dim=-1).indices.sort(-1).values
            self.query_squares = self.query_squares[:, :, :0]  # no longer needed: freed
        return self.channels

    def gather(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys [B, H, n, d]`` -> their kept channels ``[B, H, n, kept]``."""
        index = self.channels[:, :, None, :].expand(-1, -1, keys.shape[2], -1)
        return keys.gather(3, index)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """The kept channels of queries ``[B, Hq, ..., d]`` (each query head its KV head's), contiguous:
        what the decode kernels meet the pruned keys with."""
        channels = self.channels.repeat_interleave(q.shape[1] // self.channels.shape[1], 1)
        index = channels.reshape(*channels.shape[:2], *[1] * (q.dim() - 3), self.kept)
        return q.gather(-1, index.expand(*q.shape[:-1], self.kept)).contiguous()

    def scatter(self, pruned: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Kept channels ``[B, H, n, kept]`` back to ``[B, H, n, d]`` float32, dropped ones zero."""
        full = torch.zeros(*pruned.shape[:3], head_dim, device=pruned.device)
        index = self.channels[:, :, None, :].expand(-1, -1, pruned.shape[2], -1)
        return full.scatter_(3, index, pruned.float())
