"""``HeavyHitterKV``: a fixed budget of tokens per head, chosen by the attention they accumulate, the
most recent ones protected (H2O / Scissorhands), and its store."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxpress.kv.policy_checks import check_bits, check_positive, describe_bits, require
from fxpress.kv.registry import StoreShape, register_policy
from fxpress.kv.stores import FullStore, RowStore, Store


@dataclass(frozen=True)
class HeavyHitterKV:
    budget: int = 512
    recent: int = 256
    bits: int | None = None
    group_size: int = 32

    def __post_init__(self) -> None:
        check_positive("HeavyHitterKV", budget=self.budget, recent=self.recent)
        require(self.recent < self.budget, "HeavyHitterKV",
                f"recent ({self.recent}) must be smaller than budget ({self.budget}): the budget counts the "
                "recent window and the heavy hitters together")
        check_bits("HeavyHitterKV", self.bits, self.group_size)

    def describe(self) -> str:
        return f"HeavyHitterKV(budget={self.budget}, recent={self.recent}){describe_bits(self.bits)}"


class HeavyHitterStore(RowStore):
    """``budget`` slots per head: the ``recent`` newest tokens, and the rest chosen by the attention
    they have accumulated (H2O). Each slot also keeps its token's position (int32) and score (fp32)."""

    needs_mass = True

    def __init__(self, budget: int, recent: int, bits: int | None = None, group_size: int = 32, **kw) -> None:
        super().__init__(budget, bits, group_size, **kw)
        self.recent = recent
        self.position = torch.full((self.batch, self.heads, budget), -1, dtype=torch.int32, device=self.device)
        self.score = torch.zeros(self.batch, self.heads, budget, dtype=torch.float32, device=self.device)

    def nbytes(self) -> int:
        return super().nbytes() + self.position.nbytes + self.score.nbytes

    def append(self, k, v, seen, mass=None) -> None:
        if mass is None:
            raise ValueError("HeavyHitterStore.append needs the attention mass of this call")
        t, filled = k.shape[2], self.filled
        # The fused kernel moves whole rows of one width: not ThinK's narrower keys (kv/think.py).
        if t == 1 and filled == self.slots and k.is_cuda and self.keys.bits is None \
                and self.keys.head_dim == self.values.head_dim:
            from fxpress.kv.kernels.eviction import h2o_decode_update  # the decode step below, fused

            h2o_decode_update(self.score, self.position, mass, self.keys.tensors["data"],
                              self.values.tensors["data"], k, v, seen, self.recent)
            return
        self.score[:, :, :filled] += mass[:, :, :filled]
        new_score = mass[:, :, filled:]
        new_position = torch.arange(seen, seen + t, dtype=torch.int32, device=k.device).expand(self.batch, self.heads, t)
        if filled + t <= self.slots:
            self.keys.write_range(filled, k)
            self.values.write_range(filled, v)
            self.position[:, :, filled:filled + t] = new_position
            self.score[:, :, filled:filled + t] = new_score
            self.filled = filled + t
            return
        oldest_recent = seen + t - self.recent
        if t == 1:
            # Decode: the new token is recent, so it stays; it replaces the lowest-scored old one.
            priority = self.score.masked_fill(self.position >= oldest_recent, float("inf"))
            victim = priority.argmin(-1)
            self.keys.write_per_head(victim, k)
            self.values.write_per_head(victim, v)
            self.position.scatter_(2, victim[..., None], new_position)
            self.score.scatter_(2, victim[..., None], new_score)
            return
        position = torch.cat([self.position[:, :, :filled], new_position], 2)
        score = torch.cat([self.score[:, :, :filled], new_score], 2)
        priority = score.masked_fill(position >= oldest_recent, float("inf"))
        index = priority.topk(self.slots, dim=-1).indices
        self.keys.keep(filled, k, index)
        self.values.keep(filled, v, index)
        self.position.copy_(position.gather(2, index))
        self.score.copy_(score.gather(2, index))
        self.filled = self.slots


def _store(policy: HeavyHitterKV, layer: int, shape: StoreShape) -> Store:
    q = dict(bits=policy.bits, group_size=policy.group_size)
    if policy.budget >= shape.max_len:  # never evicts: a budget past the cache length allocates nothing more
        return FullStore(shape.max_len, **q, **shape.store_args())
    return HeavyHitterStore(policy.budget, policy.recent, **q, **shape.store_args())


register_policy(HeavyHitterKV, _store)
