"""``KIVI``: keys quantised per channel in groups of tokens, values per token, a full-precision
residual window (Liu et al. 2024), and its store; on CUDA the store quantises and decodes with the
Triton kernels of ``fxpress.kv.kernels.kivi``, on the CPU it decodes with the C++ kernel of
``fxpress.kv.kernels.kivi_cpu`` where a C++ compiler works."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import fxpress.kv.quant as quant
import fxpress.kv.rope_frame as rope_frame
from fxpress.kv.attention import ScoreRule
from fxpress.kv.channel_pruning import ChannelPruner
from fxpress.kv.policy_checks import QUANT_BITS, check_positive, check_sink, is_int, require
from fxpress.kv.registry import StoreShape, register_policy
from fxpress.kv.rotation import hadamard_rotation, is_power_of_two, rotate
from fxpress.kv.stores import SEGMENT_TOKENS, Store


@dataclass(frozen=True)
class KIVI:
    """``residual``: the newest tokens always stay at full precision (the window slides by
    ``group_size`` tokens, so it holds ``residual`` to ``residual + group_size - 1`` of them).
    ``sink``: the first tokens stay at full precision too. ``clip_keys``: each key group's range is
    the one, of the min-max range shrunk by 0 to 40 %, with the least squared error. Both change
    only how codes are made, not their size; ``sink=0, clip_keys=False`` is the paper's KIVI, which
    costs SmolLM2 1.7 perplexity at 2 bits (bench/kv.py). ``rotate``: keys are stored, and queries
    met, turned by a randomised Hadamard rotation of each head (``fxpress.kv.rotation``; the head
    dimension a power of two): the scores are unchanged, every channel's energy is spread over all
    of them before the per-channel quantisation, and nothing is added to the cache's bytes. On
    SmolLM2 it helped on two texts of three (bench/results/fidelity-kv-cpu-2026-12-04.md): off by
    default. ``rope_theta``: the model's rotary base (``config.rope_theta``); quantised keys are
    stored as they were before the rotary embedding and turned back when read (KVQuant;
    ``fxpress.kv.rope_frame``). Exact whatever its value: a wrong base only quantises in a less
    helpful frame. Not with ``rotate``. On SmolLM2 it takes the paper's KIVI-2 (no sink, no
    clipping) from 1.138x to 1.093x the full cache's perplexity, but with the sink and clipping
    of the defaults it moves perplexity by -1.9 to +1.0 % (README, "pre-RoPE keys"), and it slows
    the decode kernel: off by default."""

    bits: int = 2
    group_size: int = 32
    residual: int = 128
    sink: int = 4
    clip_keys: bool = True
    rotate: bool = False
    rope_theta: float | None = None

    def __post_init__(self) -> None:
        require(is_int(self.bits) and self.bits in QUANT_BITS, "KIVI",
                f"bits must be one of {QUANT_BITS}, got {self.bits!r}")
        check_positive("KIVI", group_size=self.group_size, residual=self.residual)
        check_sink("KIVI", self.sink)
        require(isinstance(self.clip_keys, bool), "KIVI", f"clip_keys must be a bool, got {self.clip_keys!r}")
        require(isinstance(self.rotate, bool), "KIVI", f"rotate must be a bool, got {self.rotate!r}")
        theta = self.rope_theta
        require(theta is None or (isinstance(theta, (int, float)) and not isinstance(theta, bool)
                                  and math.isfinite(theta) and theta > 1), "KIVI",
                f"rope_theta must be None or the model's rotary base (a number > 1), got {theta!r}")
        require(not (self.rotate and theta is not None), "KIVI",
                "rotate and rope_theta are two frames for the keys: choose one")
        per = 32 // self.bits
        require(self.group_size % per == 0, "KIVI",
                f"group_size ({self.group_size}) must be a multiple of {per}: {self.bits}-bit key codes of a "
                "group are packed along tokens, 32/bits to an int32 word")

    def describe(self) -> str:
        clip = "" if self.clip_keys else ", no key clipping"
        rotated = ", rotated keys" if self.rotate else ""
        pre_rope = "" if self.rope_theta is None else f", pre-RoPE keys (theta={self.rope_theta:g})"
        return f"KIVI-{self.bits} (G={self.group_size}, R={self.residual}, sink={self.sink}{clip}{rotated}{pre_rope})"


class KIVIStore(Store):
    """KIVI: keys quantised per channel over groups of ``G`` tokens, values per token over groups of
    ``G`` channels, both packed into int32 words. The newest tokens wait at full precision in a
    window of ``R + G`` slots; once it holds ``R + G`` tokens, the oldest ``G`` are quantised, so
    the newest ``R`` are always exact. The first ``sink`` tokens are kept exact as well. With
    ``rotate``, every key it holds (sink, window and codes) is a rotated key, and each query is
    rotated the same way on its way in, so the decode kernels run unchanged. With ``rope_theta``,
    the quantised keys (only they) are held as they were before the rotary embedding: the token
    of quantised slot ``i`` is the one at position ``sunk + i``, turned back by the kernels as they
    read it."""

    keeps_positions = True

    def __init__(self, policy: KIVI, max_len: int, prune=None, **kw) -> None:
        super().__init__(**kw)
        self.policy = policy
        bits, g, d = policy.bits, policy.group_size, self.head_dim
        per = quant.codes_per_word(bits)
        if d % g:
            raise ValueError(f"{policy.describe()} needs head_dim ({d}) to be a multiple of group_size ({g}): "
                             "values are quantised in groups of group_size channels")
        if policy.rotate and not is_power_of_two(d):
            raise ValueError(f"{policy.describe()} needs head_dim ({d}) to be a power of two: the keys' rotation "
                             "is a Hadamard matrix")
        self.rotation = hadamard_rotation(d, self.device, torch.float32) if policy.rotate else None
        # ThinK (``prune``: a ThinKV): quantised keys hold only the channels it keeps.
        self.pruner = None if prune is None else \
            ChannelPruner(prune.kept_channels(d), prune.window, self.batch, self.heads, d, self.device)
        self.wants_queries = self.pruner is not None
        kd = d if self.pruner is None else self.pruner.kept
        # The newest `residual` tokens are never quantised, so codes are needed for at most this many.
        quantised = max(max_len - policy.sink - policy.residual, 0) // g * g
        b, h, dt, dev = self.batch, self.heads, self.dtype, self.device
        self.k_codes = torch.zeros(b, h, quantised // per, kd, dtype=torch.int32, device=dev)
        self.k_scale = torch.zeros(b, h, quantised // g, kd, dtype=dt, device=dev)
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rule: ScoreRule
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.rotation is not None:  # the stored keys are rotated: meet them in the same basis
            q, k = rotate(q, self.rotation), rotate(k, self.rotation)
        if q.shape[2] == 1 and rule.plain:  # decode reads the packed codes in place
            if q.is_cuda:
                from fxpress.kv.kernels import kivi

                return kivi.decode_attention(q, self, k, v, scale), None
            from fxpress.kv.kernels import kivi_cpu

            if q.device.type == "cpu" and kivi_cpu.refusal(self) is None:
                return kivi_cpu.decode_attention(q, self, k, v, scale), None
        return super().attend(q, k, v, scale, rule)

    @property
    def waiting(self) -> int:
        return self.filled - self.sunk - self.quantised

    def state(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in ("k_codes", "k_scale", "k_lo", "v_codes", "v_scale", "v_lo",
                                              "k_residual", "v_residual", "k_sink", "v_sink")}

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.state().values()) + (0 if self.pruner is None else self.pruner.nbytes())

    def observe_queries(self, q: torch.Tensor) -> None:
        self.pruner.observe(q)

    def quantize_block(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes, scales and mins of ``n`` tokens (``n`` a multiple of the group size)."""
        bits, g = self.policy.bits, self.policy.group_size
        if self.pruner is not None:
            k = self.pruner.gather(k)
        elif k.is_cuda:  # the Triton kernels: the same codes, bit for bit
            from fxpress.kv.kernels import kivi

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
        k = k.flatten(2, 3)
        if self.policy.rope_theta is not None:
            k = rope_frame.turn(k, self.policy.rope_theta, self.sunk + start, inverse=False)
        return (k if self.pruner is None else self.pruner.scatter(k, self.head_dim)), v.flatten(3)

    def segments(self):
        if self.sunk:
            yield self.k_sink[:, :, :self.sunk].float(), self.v_sink[:, :, :self.sunk].float()
        step = max(SEGMENT_TOKENS // self.policy.group_size, 1) * self.policy.group_size
        for start in range(0, self.quantised, step):
            yield self.dequantize_range(start, min(start + step, self.quantised))
        if self.waiting:
            yield self.k_residual[:, :, :self.waiting].float(), self.v_residual[:, :, :self.waiting].float()

    def append(self, k, v, seen, mass=None) -> None:
        if self.rotation is not None:
            k = rotate(k, self.rotation)
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
        if self.pruner is not None and self.pruner.channels is None:  # ThinK: choose on every key seen
            self.pruner.choose(pending_k)
        block_k = pending_k[:, :, :flush]
        if self.policy.rope_theta is not None:
            block_k = rope_frame.turn(block_k, self.policy.rope_theta, self.sunk + start, inverse=True)
        for name, block in self.quantize_block(block_k, pending_v[:, :, :flush]).items():
            tensor = getattr(self, name)
            at = {"k_codes": start // per, "k_scale": start // g, "k_lo": start // g}.get(name, start)
            tensor[:, :, at: at + block.shape[2]] = block
        self.quantised += flush
        left = pending_k.shape[2] - flush
        self.k_residual[:, :, :left] = pending_k[:, :, flush:]
        self.v_residual[:, :, :left] = pending_v[:, :, flush:]


def _store(policy: KIVI, layer: int, shape: StoreShape) -> Store:
    return KIVIStore(policy, shape.max_len, **shape.store_args())


register_policy(KIVI, _store)
