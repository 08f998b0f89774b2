"""Decoding on the CPU with compressed KV caches and low-bit weights, against the dense baseline a
CPU user would otherwise run, side by side in one run on this machine.

Sections (markdown tables; ``--json`` writes the rows):

- ``attention``: one decode step's attention over a KIVI-2 store (the C++ kernel,
  ``fxpress/kv/kernels/kivi.cpp``; fp16 storage, ``fxpress.kv_cache``'s default) against fp32
  ``scaled_dot_product_attention`` over the full fp32 cache, at 8k and 32k tokens, SmolLM2-135M's
  heads (9 query / 3 KV, d 64) and Llama-3-8B's (32 / 8, d 128), batch 1; with the bytes each
  reads and the largest difference from the reference attention over the same store. Each call
  reads the next of several layers' caches, as a model's decode step does (so a cache is not still
  in the CPU's caches from the call before); the same layer called again is shown beside it.
- ``smollm2``: SmolLM2-135M decoding after a 4096-token prefix: tokens/s of eager fp32 with
  transformers' DynamicCache (SDPA), against 4-bit RTN weights (group 128, every Linear including
  the tied ``lm_head``, through ``lut_matmul``) and a
  KIVI-2 ``fxpress.kv_cache``, compiled with ``backend="fxpress"``, the two decoding step by step
  in turns; the compiled model's greedy tokens are compared with the same compressed model run
  eagerly.

Run: ``python bench/cpu_decode.py [attention] [smollm2] [--json PATH]``
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fxpress
from _common import cpu_model, interleaved_medians, last_level_cache_bytes, print_table, run_sections
from fxpress import workloads
from fxpress.hf.cache_argument import cache_argument
from fxpress.kv.attention import PLAIN, reference_attend
from fxpress.kv.kernels import kivi_cpu
from fxpress.kv.kivi import KIVI, KIVIStore

HEADS = {"SmolLM2-135M": (9, 3, 64), "Llama-3-8B": (32, 8, 128)}
CONTEXTS = (8192, 32768)
REPEATS = 10


def _store(hkv: int, d: int, tokens: int, dtype: torch.dtype):
    store = KIVIStore(KIVI(bits=2), tokens + 1, batch=1, heads=hkv, head_dim=d, dtype=dtype,
                      device=torch.device("cpu"))
    k, v = torch.randn(1, hkv, tokens, d), torch.randn(1, hkv, tokens, d)
    for start in range(0, tokens, 4096):
        store.append(k[:, :, start:start + 4096].to(dtype), v[:, :, start:start + 4096].to(dtype), start)
    return store, k, v


def _layers(hkv: int, d: int, tokens: int) -> list[tuple]:
    """One (KIVI-2 store, fp32 keys, fp32 values) per layer, enough layers that their fp32 caches
    are three times this CPU's last-level cache: a model's decode step reads every layer's cache
    once, so by the time a layer comes round again its cache is no longer in the CPU's caches."""
    count = max(2, math.ceil(3 * last_level_cache_bytes() / (2 * hkv * (tokens + 1) * d * 4)))
    layers = []
    for _ in range(count):
        store, k, v = _store(hkv, d, tokens, torch.float16)
        layers.append((store, k, v))
    return layers


def _cycling(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    """A call of the next of ``calls`` each time, round and round."""
    turn = itertools.count()
    return lambda: calls[next(turn) % len(calls)]()


def attention() -> list[dict]:
    rows = []
    lines = [f"CPU: {cpu_model()}; last-level cache {last_level_cache_bytes() >> 20} MiB", "",
             "| heads | tokens | layers | fp32 SDPA ms | KIVI-2 cpp ms | speedup | same layer again: SDPA ms | KIVI-2 ms "
             "| speedup | SDPA MB read | KIVI-2 MB held | max abs diff vs reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    for name, (hq, hkv, d) in HEADS.items():
        for tokens in CONTEXTS:
            layers = _layers(hkv, d, tokens)
            q, k1, v1 = torch.randn(1, hq, 1, d), torch.randn(1, hkv, 1, d), torch.randn(1, hkv, 1, d)
            sdpa, kivi = [], []
            for store, k, v in layers:
                full_k, full_v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
                sdpa.append(lambda k=full_k, v=full_v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                kivi.append(lambda s=store: kivi_cpu.decode_attention(q, s, k1, v1, d ** -0.5))
            t = interleaved_medians({"sdpa": _cycling(sdpa), "kivi": _cycling(kivi)}, REPEATS * len(layers))
            warm = interleaved_medians({"sdpa": sdpa[0], "kivi": kivi[0]}, REPEATS * len(layers))
            store = layers[0][0]
            got = kivi[0]()
            expected, _ = reference_attend(store, q, k1, v1, d ** -0.5, PLAIN)
            row = {"heads": name, "tokens": tokens, "layers": len(layers), "sdpa_ms": t["sdpa"] * 1e3,
                   "kivi_ms": t["kivi"] * 1e3, "speedup": t["sdpa"] / t["kivi"],
                   "same_layer_sdpa_ms": warm["sdpa"] * 1e3, "same_layer_kivi_ms": warm["kivi"] * 1e3,
                   "same_layer_speedup": warm["sdpa"] / warm["kivi"], "sdpa_bytes": 2 * hkv * (tokens + 1) * d * 4,
                   "kivi_bytes": store.nbytes(), "max_abs_diff": float((got - expected).abs().max())}
            rows.append(row)
            lines.append(f"| {name} | {tokens} | {len(layers)} | {row['sdpa_ms']:.2f} | {row['kivi_ms']:.2f} | "
                         f"**{row['speedup']:.2f}x** | {row['same_layer_sdpa_ms']:.2f} | {row['same_layer_kivi_ms']:.2f} | "
                         f"{row['same_layer_speedup']:.2f}x | {row['sdpa_bytes'] / 1e6:.1f} | "
                         f"{row['kivi_bytes'] / 1e6:.1f} | {row['max_abs_diff']:.1e} |")
            del layers, sdpa, kivi
    print_table(lines, None)
    return rows


PREFIX, STEPS = 4096, 16


class _Decoder:
    """One model decoding greedily with its own cache: ``prefill`` the prefix in chunks of 512,
    then one ``step`` at a time, each timed."""

    def __init__(self, model, cache) -> None:
        self.model, self.cache = model, cache
        self.tokens: list[int] = []
        self.times: list[float] = []

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        for start in range(0, PREFIX, 512):
            logits = self.model(ids[:, start:start + 512], **cache_argument(self.cache), logits_to_keep=1,
                                position_ids=torch.arange(start, start + 512)[None]).logits
        self.token = logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self) -> None:
        t0 = time.perf_counter()
        position = torch.tensor([[PREFIX + len(self.tokens)]])
        logits = self.model(self.token, **cache_argument(self.cache), position_ids=position).logits
        self.token = logits[:, -1].argmax(-1, keepdim=True)
        self.times.append(time.perf_counter() - t0)
        self.tokens.append(int(self.token))

    def median_step(self) -> float:
        return statistics.median(self.times[2:])


def smollm2() -> list[dict]:
    from transformers import DynamicCache

    model, tokenizer = workloads.load_smollm2()
    ids = tokenizer(workloads.lee_background(), return_tensors="pt").input_ids[:, :PREFIX]
    # Every Linear, the tied lm_head too (a quantised copy; the embedding keeps the fp32 table).
    compressed = fxpress.compress.quantize(model, bits=4, group_size=128, skip=()).model
    eager = _Decoder(compressed, fxpress.kv_cache(compressed, PREFIX + STEPS, KIVI(bits=2)))
    eager.prefill(ids)
    for _ in range(STEPS):
        eager.step()
    compiled = torch.compile(compressed, backend="fxpress", dynamic=True)
    ours = _Decoder(compiled, fxpress.kv_cache(compressed, PREFIX + STEPS, KIVI(bits=2)))
    dense = _Decoder(model, DynamicCache(config=model.config))
    ours.prefill(ids)
    dense.prefill(ids)
    for _ in range(STEPS):  # step by step in turns: a slow spell of the machine falls on both
        dense.step()
        ours.step()
    per_step = {"dense": dense.median_step(), "compressed_eager": eager.median_step(),
                "compressed_fxpress": ours.median_step()}
    row = {"prefix": PREFIX, "steps": STEPS, **{f"{k}_tokens_per_s": 1 / v for k, v in per_step.items()},
           "speedup_vs_dense": per_step["dense"] / per_step["compressed_fxpress"],
           "greedy_tokens_equal_to_eager": ours.tokens == eager.tokens}
    lines = [f"CPU: {cpu_model()}", "", "| model | tokens/s | vs eager fp32 dense |", "|---|---|---|",
             f"| eager fp32, DynamicCache (SDPA) | {row['dense_tokens_per_s']:.1f} | 1.00x |",
             f"| 4-bit RTN + KIVI-2, eager | {row['compressed_eager_tokens_per_s']:.1f} | "
             f"{per_step['dense'] / per_step['compressed_eager']:.2f}x |",
             f"| 4-bit RTN + KIVI-2, fxpress | {row['compressed_fxpress_tokens_per_s']:.1f} | "
             f"{row['speedup_vs_dense']:.2f}x |", "",
             f"fxpress greedy tokens equal to the same model run eagerly: {row['greedy_tokens_equal_to_eager']}"]
    print_table(lines, None)
    return [row]


if __name__ == "__main__":
    run_sections({"attention": attention, "smollm2": smollm2})
