"""``StreamingKV``: the first ``sink`` tokens and the last ``recent`` ones (StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass

from fxpress.kv.policy_checks import check_bits, check_positive, check_sink, describe_bits
from fxpress.kv.registry import StoreShape, register_policy
from fxpress.kv.stores import Store, streaming_store


@dataclass(frozen=True)
class StreamingKV:
    sink: int = 4
    recent: int = 1020
    bits: int | None = None
    group_size: int = 32

    def __post_init__(self) -> None:
        check_sink("StreamingKV", self.sink)
        check_positive("StreamingKV", recent=self.recent)
        check_bits("StreamingKV", self.bits, self.group_size)

    def describe(self) -> str:
        return f"StreamingKV(sink={self.sink}, recent={self.recent}){describe_bits(self.bits)}"


def _store(policy: StreamingKV, layer: int, shape: StoreShape) -> Store:
    return streaming_store(policy.sink, policy.recent, shape.max_len, bits=policy.bits,
                           group_size=policy.group_size, **shape.store_args())


register_policy(StreamingKV, _store)
