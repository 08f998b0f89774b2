"""Compressed KV storage of one attention layer, one class per policy.

A store holds what its policy keeps of the tokens seen so far, allocated once at its largest size,
so the bytes it reports are the bytes it holds. Every store offers:

- ``segments()``: the stored tokens as float32 ``(K, V)`` blocks ``[B, H, n, d]``, dequantised one
  block at a time (all of them visible to every new query: they came earlier);
- ``append(k, v, seen, mass)``: take a chunk of new tokens after attention has run over it;
  ``mass`` is the attention each stored-then-new key received in this call, given only to stores
  with ``needs_mass``;
- ``nbytes()``: every byte of state: codes, scales, mins, residual window, positions, scores.

Stores never group numbers across batch rows or heads, so one sequence's outliers never stretch
another's quantisation range.
"""

from __future__ import annotations

from typing import Iterator

import torch

from fxpress.kv import quant
from fxpress.kv.policies import KIVI, DuoAttentionKV, FullKV, HeavyHitterKV, Policy, StreamingKV
from fxpress.kv.rows import Rows

# Stored tokens are dequantised this many at a time: bounded temporaries at any context length.
SEGMENT_TOKENS = 1024


class Store:
    needs_mass = False

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.dtype, self.device = dtype, device
        self.filled = 0  # tokens held

    def nbytes(self) -> int:
        raise NotImplementedError

    def segments(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def append(self, k: torch.Tensor, v: torch.Tensor, seen: int, mass: torch.Tensor | None = None) -> None:
        raise NotImplementedError


class _RowStore(Store):
    """Keys and values as :class:`Rows` with ``slots`` slots, ``filled`` of them valid."""

    def __init__(self, slots: int, bits: int | None, group_size: int, **kw) -> None:
        super().__init__(**kw)
        self.slots = slots
        make = dict(dtype=self.dtype, device=self.device, bits=bits, group_size=group_size)
        self.keys = Rows(self.batch, self.heads, slots, self.head_dim, **make)
        self.values = Rows(self.batch, self.heads, slots, self.head_dim, **make)

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()

    def segments(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.filled, SEGMENT_TOKENS):
            stop = min(start + SEGMENT_TOKENS, self.filled)
            yield self.keys.read(start, stop), self.values.read(start, stop)


class FullStore(_RowStore):
    """Every token, in arrival order."""

    def __init__(self, max_len: int, bits: int | None = None, group_size: int = 32, **kw) -> None:
        super().__init__(max_len, bits, group_size, **kw)

    def append(self, k, v, seen, mass=None) -> None:
        self.keys.write_range(self.filled, k)
        self.values.write_range(self.filled, v)
        self.filled += k.shape[2]


class StreamingStore(_RowStore):
    """Token ``p`` lives in slot ``p`` while ``p < sink``, then in a ring of ``recent`` slots."""

    def __init__(self, sink: int, recent: int, bits: int | None = None, group_size: int = 32, **kw) -> None:
        super().__init__(sink + recent, bits, group_size, **kw)
        self.sink, self.recent = sink, recent

    def append(self, k, v, seen, mass=None) -> None:
        t = k.shape[2]
        positions = torch.arange(seen, seen + t, device=k.device)
        # Of a long chunk only the sinks and the last `recent` tokens survive; write just those.
        survives = (positions < self.sink) | (positions >= seen + t - self.recent)
        chosen = positions[survives]
        slots = torch.where(chosen < self.sink, chosen, self.sink + (chosen - self.sink) % self.recent)
        index = survives.nonzero().squeeze(1)
        self.keys.write_slots(slots, k.index_select(2, index))
        self.values.write_slots(slots, v.index_select(2, index))
        self.filled = min(seen + t, self.slots)


class HeavyHitterStore(_RowStore):
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
        if t == 1 and filled == self.slots and k.is_cuda and self.keys.bits is None:
            from fxpress.codegen.kernels.eviction import h2o_decode_update  # the decode step below, fused

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


class KIVIStore(Store):
    """KIVI: keys quantised per channel over groups of ``G`` tokens, values per token over groups of
    ``G`` channels, both packed into int32 words. The newest tokens wait at full precision in a
    window of ``R + G`` slots; once it holds ``R + G`` tokens, the oldest ``G`` are quantised, so
    the newest ``R`` are always exact. The first ``sink`` tokens are kept exact as well."""

    def __init__(self, policy: KIVI, max_len: int, **kw) -> None:
        super().__init__(**kw)
        self.policy = policy
        bits, g, d = policy.bits, policy.group_size, self.head_dim
        per = quant.codes_per_word(bits)
        if d % g:
            raise ValueError(f"{policy.describe()} needs head_dim ({d}) to be a multiple of group_size ({g}): "
                             "values are quantised in groups of group_size channels")
        # The newest `residual` tokens are never quantised, so codes are needed for at most this many.
        quantised = max(max_len - policy.sink - policy.residual, 0) // g * g
        b, h, dt, dev = self.batch, self.heads, self.dtype, self.device
        self.k_codes = torch.zeros(b, h, quantised // per, d, dtype=torch.int32, device=dev)
        self.k_scale = torch.zeros(b, h, quantised // g, d, dtype=dt, device=dev)
        self.k_lo = torch.zeros_like(self.k_scale)
        self.v_codes = torch.zeros(b, h, quantised, d // per, dtype=torch.int32, device=dev)
        self.v_scale = torch.zeros(b, h, quantised, d // g, dtype=dt, device=dev)
        self.v_lo = torch.zeros_like(self.v_scale)
        self.k_residual = torch.zeros(b, h, policy.residual + g, d, dtype=dt, device=dev)
        self.v_residual = torch.zeros_like(self.k_residual)
        self.k_sink = torch.zeros(b, h, policy.sink, d, dtype=dt, device=dev)
        self.v_sink = torch.zeros_like(self.k_sink)
        self.sunk = 0       # tokens in the sink
        self.quantised = 0  # tokens in codes; the rest of `filled` waits in the residual window

    @property
    def waiting(self) -> int:
        return self.filled - self.sunk - self.quantised

    def state(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in ("k_codes", "k_scale", "k_lo", "v_codes", "v_scale", "v_lo",
                                              "k_residual", "v_residual", "k_sink", "v_sink")}

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.state().values())

    def quantize_block(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes, scales and mins of ``n`` tokens (``n`` a multiple of the group size)."""
        bits, g = self.policy.bits, self.policy.group_size
        if k.is_cuda:  # the Triton kernels: the same codes, bit for bit
            from fxpress.codegen.kernels import kivi

            return {**kivi.quantize_keys(k.contiguous(), bits, g, self.dtype, clip=self.policy.clip_keys),
                    **kivi.quantize_values(v.contiguous(), bits, g, self.dtype)}
        kc, ks, kl = quant.quantize(k.unflatten(2, (-1, g)), bits, 3, self.dtype, clip=self.policy.clip_keys)
        vc, vs, vl = quant.quantize(v.unflatten(3, (-1, g)), bits, 4, self.dtype)
        return {"k_codes": quant.pack(kc.flatten(2, 3), bits, 2), "k_scale": ks.squeeze(3), "k_lo": kl.squeeze(3),
                "v_codes": quant.pack(vc.flatten(3), bits, 3), "v_scale": vs.squeeze(4), "v_lo": vl.squeeze(4)}

    def dequantize_range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        bits, g = self.policy.bits, self.policy.group_size
        per = quant.codes_per_word(bits)
        kc = quant.unpack(self.k_codes[:, :, start // per: stop // per], bits, 2).unflatten(2, (-1, g))
        k = quant.dequantize(kc, self.k_scale[:, :, start // g: stop // g, None], self.k_lo[:, :, start // g: stop // g, None])
        vc = quant.unpack(self.v_codes[:, :, start:stop], bits, 3).unflatten(3, (-1, g))
        v = quant.dequantize(vc, self.v_scale[:, :, start:stop, :, None], self.v_lo[:, :, start:stop, :, None])
        return k.flatten(2, 3), v.flatten(3)

    def segments(self):
        if self.sunk:
            yield self.k_sink[:, :, :self.sunk].float(), self.v_sink[:, :, :self.sunk].float()
        step = max(SEGMENT_TOKENS // self.policy.group_size, 1) * self.policy.group_size
        for start in range(0, self.quantised, step):
            yield self.dequantize_range(start, min(start + step, self.quantised))
        if self.waiting:
            yield self.k_residual[:, :, :self.waiting].float(), self.v_residual[:, :, :self.waiting].float()

    def append(self, k, v, seen, mass=None) -> None:
        t = k.shape[2]
        self.filled += t
        into_sink = max(0, min(self.policy.sink - seen, t))
        if into_sink:
            self.k_sink[:, :, self.sunk:self.sunk + into_sink] = k[:, :, :into_sink]
            self.v_sink[:, :, self.sunk:self.sunk + into_sink] = v[:, :, :into_sink]
            self.sunk += into_sink
            k, v = k[:, :, into_sink:], v[:, :, into_sink:]
        waiting = self.waiting - k.shape[2]
        g = self.policy.group_size
        flush = max(0, waiting + k.shape[2] - self.policy.residual) // g * g
        if not flush:  # most decode steps: the new tokens just join the window
            self.k_residual[:, :, waiting:waiting + k.shape[2]] = k
            self.v_residual[:, :, waiting:waiting + v.shape[2]] = v
            return
        pending_k = torch.cat([self.k_residual[:, :, :waiting].float(), k.float()], 2)
        pending_v = torch.cat([self.v_residual[:, :, :waiting].float(), v.float()], 2)
        per, start = quant.codes_per_word(self.policy.bits), self.quantised
        for name, block in self.quantize_block(pending_k[:, :, :flush], pending_v[:, :, :flush]).items():
            tensor = getattr(self, name)
            at = {"k_codes": start // per, "k_scale": start // g, "k_lo": start // g}.get(name, start)
            tensor[:, :, at: at + block.shape[2]] = block
        self.quantised += flush
        left = pending_k.shape[2] - flush
        self.k_residual[:, :, :left] = pending_k[:, :, flush:]
        self.v_residual[:, :, :left] = pending_v[:, :, flush:]


class DuoStore(Store):
    """Retrieval heads keep every token; streaming heads keep sink + recent. Two stores of their
    own sizes, not one full-size cache with a mask."""

    def __init__(self, policy: DuoAttentionKV, retrieval: tuple[int, ...], max_len: int, **kw) -> None:
        super().__init__(**kw)
        heads = kw.pop("heads")
        self.retrieval = torch.tensor(retrieval, dtype=torch.long, device=self.device)
        self.streaming = torch.tensor([h for h in range(heads) if h not in retrieval], dtype=torch.long, device=self.device)
        q = dict(bits=policy.bits, group_size=policy.group_size)
        self.parts = []
        if len(retrieval):
            self.parts.append((self.retrieval, FullStore(max_len, heads=len(retrieval), **q, **kw)))
        if len(self.streaming):
            self.parts.append((self.streaming, streaming_store(policy.sink, policy.recent, max_len,
                                                               heads=len(self.streaming), **q, **kw)))

    def nbytes(self) -> int:
        return sum(store.nbytes() for _, store in self.parts)

    def append(self, k, v, seen, mass=None) -> None:
        for heads, store in self.parts:
            store.append(k.index_select(1, heads), v.index_select(1, heads), seen)
        self.filled += k.shape[2]


def streaming_store(sink: int, recent: int, max_len: int, **kw) -> Store:
    """Sink + recent tokens; a window as long as the cache never evicts and is a full store."""
    return FullStore(max_len, **kw) if sink + recent >= max_len else StreamingStore(sink, recent, **kw)


def make_store(policy: Policy, layer: int, *, batch: int, kv_heads: int, head_dim: int, max_len: int,
               dtype: torch.dtype, device: torch.device) -> Store:
    kw = dict(batch=batch, heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device)
    if isinstance(policy, FullKV):
        return FullStore(max_len, **kw)
    if isinstance(policy, KIVI):
        return KIVIStore(policy, max_len, **kw)
    q = dict(bits=policy.bits, group_size=policy.group_size)
    if isinstance(policy, StreamingKV):
        return streaming_store(policy.sink, policy.recent, max_len, **q, **kw)
    if isinstance(policy, HeavyHitterKV):
        if policy.budget >= max_len:  # never evicts: a budget past the cache length allocates nothing more
            return FullStore(max_len, **q, **kw)
        return HeavyHitterStore(policy.budget, policy.recent, **q, **kw)
    if isinstance(policy, DuoAttentionKV):
        if layer >= len(policy.retrieval_heads):
            raise ValueError(f"DuoAttentionKV has a head pattern for {len(policy.retrieval_heads)} layers; "
                             f"the model has a layer {layer}")
        heads = policy.retrieval_heads[layer]
        if heads and heads[-1] >= kv_heads:
            raise ValueError(f"DuoAttentionKV.retrieval_heads[{layer}] names KV head {heads[-1]}; "
                             f"layer {layer} has {kv_heads} KV heads")
        return DuoStore(policy, heads, max_len, **kw)
    raise TypeError(f"no store for {type(policy).__name__}")
