"""KV-cache policies: what a compressed cache keeps, and at which precision.

Each policy is a frozen dataclass validated when it is made, so a bad constant fails at the call
that wrote it, not deep inside a forward. A policy says nothing about storage layout; the stores in
``fxpress.kv.stores`` turn it into tensors.

- ``FullKV``: every token at full precision (the exact reference).
- ``KIVI``: keys quantised per channel in groups of tokens, values per token, a full-precision
  residual window (Liu et al. 2024).
- ``StreamingKV``: the first ``sink`` tokens and the last ``recent`` ones (StreamingLLM).
- ``DuoAttentionKV``: every token for retrieval heads, sink + recent for the others; the head
  pattern is data.
- ``HeavyHitterKV``: a fixed budget of tokens per head, chosen by accumulated attention, the most
  recent ones protected (H2O / Scissorhands).

The eviction policies compose with quantisation: ``bits=4`` stores the kept tokens as 4-bit codes,
quantised per token (a token can be evicted on its own, so its codes may not share a group with
other tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fxpress.compiler.errors import KVCacheError, OptionError

QUANT_BITS = (2, 4, 8)


def _require(ok: bool, policy: str, message: str) -> None:
    if not ok:
        raise OptionError(f"fxpress.{policy}: {message}")


def _check_positive(policy: str, **values: int) -> None:
    for name, value in values.items():
        _require(_is_int(value) and value > 0,
                 policy, f"{name} must be a positive int, got {value!r}")


def _check_sink(policy: str, sink: int) -> None:
    _require(_is_int(sink) and sink >= 0, policy,
             f"sink must be an int >= 0, got {sink!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bits(policy: str, bits: int | None, group_size: int) -> None:
    if bits is not None:
        _require(_is_int(bits) and bits in QUANT_BITS, policy,
                 f"bits must be one of {QUANT_BITS} or None, got {bits!r}")
    _check_positive(policy, group_size=group_size)


@dataclass(frozen=True)
class FullKV:
    """Keep every token at full precision: the compressed-cache machinery with nothing compressed."""

    def describe(self) -> str:
        return "full"


@dataclass(frozen=True)
class KIVI:
    """``residual``: the newest tokens always stay at full precision (the window slides by
    ``group_size`` tokens, so it holds ``residual`` to ``residual + group_size - 1`` of them).
    ``sink``: the first tokens stay at full precision too. ``clip_keys``: each key group's range is
    the one, of the min-max range shrunk by 0 to 40 %, with the least squared error. Both change
    only how codes are made, not their size; ``sink=0, clip_keys=False`` is the paper's KIVI, which
    costs SmolLM2 1.7 perplexity at 2 bits (bench/kv.py)."""

    bits: int = 2
    group_size: int = 32
    residual: int = 128
    sink: int = 4
    clip_keys: bool = True

    def __post_init__(self) -> None:
        _require(_is_int(self.bits) and self.bits in QUANT_BITS, "KIVI",
                 f"bits must be one of {QUANT_BITS}, got {self.bits!r}")
        _check_positive("KIVI", group_size=self.group_size, residual=self.residual)
        _check_sink("KIVI", self.sink)
        _require(isinstance(self.clip_keys, bool), "KIVI", f"clip_keys must be a bool, got {self.clip_keys!r}")
        per = 32 // self.bits
        _require(self.group_size % per == 0, "KIVI",
                 f"group_size ({self.group_size}) must be a multiple of {per}: {self.bits}-bit key codes of a "
                 "group are packed along tokens, 32/bits to an int32 word")

    def describe(self) -> str:
        clip = "" if self.clip_keys else ", no key clipping"
        return f"KIVI-{self.bits} (G={self.group_size}, R={self.residual}, sink={self.sink}{clip})"


@dataclass(frozen=True)
class StreamingKV:
    sink: int = 4
    recent: int = 1020
    bits: int | None = None
    group_size: int = 32

    def __post_init__(self) -> None:
        _check_sink("StreamingKV", self.sink)
        _check_positive("StreamingKV", recent=self.recent)
        _check_bits("StreamingKV", self.bits, self.group_size)

    def describe(self) -> str:
        return f"StreamingKV(sink={self.sink}, recent={self.recent}){_bits(self.bits)}"


@dataclass(frozen=True)
class DuoAttentionKV:
    """``retrieval_heads[layer]`` lists the KV heads of that layer that keep every token."""

    retrieval_heads: tuple[tuple[int, ...], ...]
    sink: int = 64
    recent: int = 256
    bits: int | None = None
    group_size: int = 32

    def __post_init__(self) -> None:
        heads = self.retrieval_heads
        _require(isinstance(heads, (tuple, list)) and all(isinstance(h, (tuple, list, set, frozenset)) for h in heads),
                 "DuoAttentionKV", "retrieval_heads must be a sequence (one entry per layer) of KV-head index "
                 f"sequences, got {heads!r}")
        normalised = tuple(tuple(sorted(set(layer))) for layer in heads)
        for i, layer in enumerate(normalised):
            _require(all(isinstance(h, int) and h >= 0 for h in layer), "DuoAttentionKV",
                     f"retrieval_heads[{i}] must hold KV-head indices >= 0, got {layer!r}")
        object.__setattr__(self, "retrieval_heads", normalised)
        _check_sink("DuoAttentionKV", self.sink)
        _check_positive("DuoAttentionKV", recent=self.recent)
        _check_bits("DuoAttentionKV", self.bits, self.group_size)

    @classmethod
    def from_scores(cls, scores: Sequence[Sequence[float]], fraction: float, **kwargs) -> DuoAttentionKV:
        """Retrieval heads = the ``fraction`` of (layer, KV head) pairs with the highest scores,
        chosen over the whole model as DuoAttention's deploy step does."""
        _require(0.0 <= fraction <= 1.0, "DuoAttentionKV", f"fraction must lie in [0, 1], got {fraction!r}")
        flat = [(float(s), layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row)]
        keep = {(layer, head) for _, layer, head in sorted(flat, reverse=True)[: round(fraction * len(flat))]}
        heads = tuple(tuple(h for h in range(len(row)) if (layer, h) in keep) for layer, row in enumerate(scores))
        return cls(retrieval_heads=heads, **kwargs)

    def describe(self) -> str:
        n = sum(len(h) for h in self.retrieval_heads)
        return f"DuoAttentionKV({n} retrieval heads, sink={self.sink}, recent={self.recent}){_bits(self.bits)}"


@dataclass(frozen=True)
class HeavyHitterKV:
    budget: int = 512
    recent: int = 256
    bits: int | None = None
    group_size: int = 32

    def __post_init__(self) -> None:
        _check_positive("HeavyHitterKV", budget=self.budget, recent=self.recent)
        _require(self.recent < self.budget, "HeavyHitterKV",
                 f"recent ({self.recent}) must be smaller than budget ({self.budget}): the budget counts the "
                 "recent window and the heavy hitters together")
        _check_bits("HeavyHitterKV", self.bits, self.group_size)

    def describe(self) -> str:
        return f"HeavyHitterKV(budget={self.budget}, recent={self.recent}){_bits(self.bits)}"


def _bits(bits: int | None) -> str:
    return "" if bits is None else f" + {bits}-bit"


Policy = FullKV | KIVI | StreamingKV | DuoAttentionKV | HeavyHitterKV
POLICIES = (FullKV, KIVI, StreamingKV, DuoAttentionKV, HeavyHitterKV)


def check_head_dim(policy: Policy, head_dim: int, where: str) -> None:
    """Refuse, when a cache is made, a policy that cannot quantise heads of ``head_dim`` channels:
    quantised values are grouped over ``group_size`` channels."""
    bits, group = getattr(policy, "bits", None), getattr(policy, "group_size", None)
    if bits is not None and head_dim % group:
        divisors = [g for g in (8, 16, 32, 64, 128) if head_dim % g == 0 and g % (32 // bits) == 0]
        raise KVCacheError(f"{where}: {policy.describe()} quantises values in groups of group_size={group} "
                           f"channels, which head_dim {head_dim} is not a multiple of; use group_size in "
                           f"{divisors or [head_dim]}")


def check_policy(policy: object, where: str) -> Policy:
    if not isinstance(policy, POLICIES):
        names = ", ".join(f"fxpress.{p.__name__}" for p in POLICIES)
        raise OptionError(f"{where}: expected a KV policy ({names}), got {type(policy).__name__}")
    return policy
