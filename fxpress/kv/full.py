"""``FullKV``: every token at full precision, the exact reference of every other policy."""

from __future__ import annotations

from dataclasses import dataclass

from fxpress.kv.registry import StoreShape, register_policy
from fxpress.kv.stores import FullStore, Store


@dataclass(frozen=True)
class FullKV:
    """Keep every token at full precision: the compressed-cache machinery with nothing compressed."""

    def describe(self) -> str:
        return "full"


def _store(policy: FullKV, layer: int, shape: StoreShape) -> Store:
    return FullStore(shape.max_len, **shape.store_args())


register_policy(FullKV, _store)
