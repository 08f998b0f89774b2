"""Compressed KV caches on the real SmolLM2-135M (fp32 weights, CPU): bytes, memory, speed, accuracy.

KV bytes: every byte of a cache's state (codes, scales, mins, residual window, kept tokens,
positions, scores), read from the tensors it allocated, as a fraction of an fp16 cache holding the
same tokens (2 x 3 KV heads x 64 x 2 bytes = 768 bytes per token per layer).

Sections (each prints a markdown table and adds its rows to the JSON):

- ``accuracy``: the first 1280 tokens of lee_background. A cache built for the 1024-token prefix is
  prefilled and its bytes measured; then, with a cache built for the whole run, the 256 tokens after
  the prefix are scored in one forward (perplexity), and ``model.generate`` continues the prefix
  greedily for 64 tokens (agreement with the uncompressed model's continuation, position by
  position). Eviction policies are sized to 50 % and 75 % fewer KV bytes than fp16, counting their
  positions and scores; DuoAttention's heads are scored on a different stretch of the corpus.
- ``memory``: one process per policy; chunked prefill (512 tokens a chunk) of a 2k / 8k context then
  8 decode steps, under torch's profiler: bytes still allocated at the end (the cache) and the peak.
- ``latency``: median decode-step time at 2k / 8k context against the fp16 cache.

Run: ``python bench/kv.py [accuracy] [memory] [latency] [--json PATH] [--markdown PATH] [--kvpress PATH]``
(``python bench/kv.py none --merge a.json b.json --markdown PATH`` only renders earlier results.)
The kvpress side of the accuracy table comes from ``bench/kv_kvpress.py`` (its own venv).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fxpress
from fxpress import workloads
from fxpress.hf.cache_argument import cache_argument
from fxpress.hf.kv_cache import kv_cache
from fxpress.hf.perplexity import perplexity
from fxpress.kv import KIVI, DuoAttentionKV, FullKV, HeavyHitterKV, StreamingKV
from fxpress.kv.duo_heads import retrieval_head_scores

PREFIX, SCORED, GENERATED = 1024, 256, 64
FP16_BYTES_PER_TOKEN_LAYER = 2 * 3 * 64 * 2
LAYERS, KV_HEADS = 30, 3


def corpus_ids(tokenizer: Any, start: int, count: int) -> torch.Tensor:
    return tokenizer(workloads.lee_background(), return_tensors="pt").input_ids[:, start:start + count]


def eviction_policies(reduction: float, duo_scores: list[list[float]]) -> dict[str, Any]:
    """Streaming, H2O and DuoAttention sized to ``reduction`` fewer KV bytes than fp16 at PREFIX tokens."""
    keep = int((1 - reduction) * PREFIX)
    # An H2O slot also holds its token's int32 position and fp32 score: 8 bytes per KV head.
    hh_budget = int(keep * FP16_BYTES_PER_TOKEN_LAYER / (FP16_BYTES_PER_TOKEN_LAYER + 8 * KV_HEADS))
    sink, recent = (64, 256) if reduction <= 0.5 else (64, 128)
    streamed = sink + recent
    heads = LAYERS * KV_HEADS
    # Retrieval heads hold PREFIX tokens, the others sink + recent: the largest share within budget.
    fraction = int(heads * (keep - streamed) / (PREFIX - streamed)) / heads
    return {
        "StreamingKV": StreamingKV(sink=4, recent=keep - 4),
        "HeavyHitterKV": HeavyHitterKV(budget=hh_budget, recent=hh_budget // 2),
        "DuoAttentionKV": DuoAttentionKV.from_scores(duo_scores, fraction, sink=sink, recent=recent),
    }


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any) -> list[dict[str, Any]]:
    ids = corpus_ids(tokenizer, 0, PREFIX + SCORED)
    duo_scores = retrieval_head_scores(model, corpus_ids(tokenizer, 20000, PREFIX), sink=64, recent=128)
    model.set_attn_implementation("sdpa")
    from transformers import DynamicCache

    reference_ppl = perplexity(model, ids, PREFIX, DynamicCache(config=model.config))
    reference = model.generate(ids[:, :PREFIX], max_new_tokens=GENERATED, min_new_tokens=GENERATED,
                               do_sample=False)[:, PREFIX:]
    runs: list[tuple[str, str, Any]] = [("none", "FullKV fp16", FullKV()),
                                        ("-", "KIVI-4", KIVI(bits=4)), ("-", "KIVI-2", KIVI(bits=2)),
                                        ("-", "KIVI-2 R=32", KIVI(bits=2, residual=32)),
                                        ("-", "KIVI-2 paper (sink=0, no key clipping)",
                                         KIVI(bits=2, sink=0, clip_keys=False))]
    for reduction in (0.5, 0.75):
        runs += [(f"{reduction:.0%}", name, p) for name, p in eviction_policies(reduction, duo_scores).items()]
    runs.append(("75%", "StreamingKV + KIVI-4 codes", StreamingKV(sink=4, recent=508, bits=4)))
    rows = [{"target": "none", "policy": "uncompressed (HF DynamicCache, fp32)", "kv_fraction": None,
             "ppl": reference_ppl, "greedy_agreement": 1.0}]
    for target, name, policy in runs:
        rows.append({"target": target, **measure_policy(model, ids, reference, name, policy)})
    model.set_attn_implementation("sdpa")
    return rows


def measure_policy(model: Any, ids: torch.Tensor, reference: torch.Tensor, name: str, policy: Any) -> dict[str, Any]:
    """One policy on the accuracy protocol: its KV bytes after the prefix, the perplexity of the
    scored tokens, and its greedy continuation's agreement with ``reference``."""
    measured = kv_cache(model, PREFIX, policy)
    model(ids[:, :PREFIX], **cache_argument(measured), logits_to_keep=1)
    fraction = measured.nbytes() / (FP16_BYTES_PER_TOKEN_LAYER * LAYERS * PREFIX)
    ppl = perplexity(model, ids, PREFIX, kv_cache(model, PREFIX + SCORED, policy))
    out = model.generate(ids[:, :PREFIX], **cache_argument(kv_cache(model, PREFIX + GENERATED, policy)),
                         max_new_tokens=GENERATED, min_new_tokens=GENERATED, do_sample=False)[:, PREFIX:]
    agreement = (out == reference).float().mean().item()
    print(f"  {name:28s} {policy.describe():60s} kv {fraction:.3f} ppl {ppl:.2f} agree {agreement:.3f}", flush=True)
    return {"policy": name, "detail": policy.describe(), "kv_fraction": fraction, "ppl": ppl,
            "greedy_agreement": agreement}


def _memory_child(policy_name: str, context: int) -> dict[str, Any]:
    """Runs in its own process: prefill ``context`` tokens in chunks, decode 8, profile tensor bytes."""
    model, tokenizer = workloads.load_smollm2()
    ids = corpus_ids(tokenizer, 0, context + 8)
    policy = MEMORY_POLICIES[policy_name]
    from _memory import live_bytes

    def run() -> Any:
        cache = _cache(model, policy, context + 8)
        _prefill(model, ids, cache, context)
        for i in range(8):
            model(ids[:, context + i:context + i + 1], **cache_argument(cache),
                  position_ids=torch.tensor([[context + i]]))
        return cache

    with torch.no_grad():
        cache, peak, live = live_bytes(run)
    state = cache.nbytes() if hasattr(cache, "nbytes") else sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return {"policy": policy_name, "context": context, "state_bytes": state, "live_after": live, "peak": peak}


def _cache(model: Any, policy: Any, max_len: int) -> Any:
    """The policy's compressed cache (fp16 storage), or for ``None`` transformers' own DynamicCache."""
    if policy is not None:
        return kv_cache(model, max_len, policy, dtype=torch.float16)
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    return DynamicCache(config=model.config)


def _prefill(model: Any, ids: torch.Tensor, cache: Any, context: int, chunk: int = 512) -> None:
    for start in range(0, context, chunk):
        stop = min(start + chunk, context)
        model(ids[:, start:stop], **cache_argument(cache), logits_to_keep=1,
              position_ids=torch.arange(start, stop)[None])


MEMORY_POLICIES: dict[str, Any] = {
    "HF DynamicCache fp32": None,
    "FullKV fp16": FullKV(),
    "KIVI-4": KIVI(bits=4),
    "KIVI-2": KIVI(bits=2),
    "KIVI-2 R=32": KIVI(bits=2, residual=32),
    "KIVI-2, rotated keys": KIVI(bits=2, rotate=True),
    "KIVI-2, pre-RoPE keys": KIVI(bits=2, rope_theta=1e5),  # SmolLM2's rope_theta
    "StreamingKV 4+1020": StreamingKV(sink=4, recent=1020),
    "HeavyHitterKV budget 1024": HeavyHitterKV(budget=1024, recent=512),
}


def memory(contexts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for context in contexts:
        for name in MEMORY_POLICIES:
            out = subprocess.run([sys.executable, __file__, "--memory-child", name, str(context)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {context:6d} {name:28s} state {row['state_bytes'] / 2**20:8.1f} MiB  live after "
                  f"{row['live_after'] / 2**20:8.1f} MiB  peak {row['peak'] / 2**20:8.1f} MiB", flush=True)
    return rows


@torch.no_grad()
def latency(model: Any, tokenizer: Any, contexts: list[int], steps: int = 8) -> list[dict[str, Any]]:
    rows = []
    for context in contexts:
        ids = corpus_ids(tokenizer, 0, context + steps + 1)
        for name, policy in MEMORY_POLICIES.items():
            cache = _cache(model, policy, context + steps + 1)
            _prefill(model, ids, cache, context)
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                model(ids[:, context + i:context + i + 1], **cache_argument(cache),
                      position_ids=torch.tensor([[context + i]]))
                times.append(time.perf_counter() - t0)
            rows.append({"policy": name, "context": context, "ms": 1e3 * statistics.median(times[1:])})
            print(f"  {context:6d} {name:28s} {rows[-1]['ms']:8.1f} ms/step", flush=True)
    model.set_attn_implementation("sdpa")
    return rows


def render(results: dict[str, Any], kvpress: dict[str, Any] | None) -> str:
    """Markdown tables of a results JSON, with kvpress's rows beside the accuracy table."""
    lines = [f"# Compressed KV caches on SmolLM2-135M (CPU) — fxpress {results.get('fxpress')}, "
             f"torch {results.get('torch')}", ""]
    if "accuracy" in results:
        reference = results["accuracy"][0]
        lines += ["## Accuracy: 1024-token prefix of lee_background, perplexity of the next 256 tokens, greedy "
                  "agreement over 64 generated tokens", "",
                  f"Uncompressed (transformers DynamicCache, fp32): perplexity {reference['ppl']:.2f}.", "",
                  "| KV bytes removed (target) | fxpress policy | KV bytes / fp16 (measured) | perplexity | greedy "
                  "agreement | kvpress press (same tokens removed) | perplexity | greedy agreement |",
                  "|---|---|---|---|---|---|---|---|"]
        presses: dict[float, list[dict[str, Any]]] = {}
        for row in (kvpress or {}).get("rows", []):
            presses.setdefault(row["compression_ratio"], []).append(row)
        for row in results["accuracy"][1:]:
            target = row["target"]
            ratio = {"50%": 0.5, "75%": 0.75}.get(target)
            lines.append(f"| {target} | {row['detail']} | {row['kv_fraction']:.3f} | {row['ppl']:.2f} | "
                         f"{row['greedy_agreement']:.2f} | | | |")
            if ratio is not None and row["policy"] == "DuoAttentionKV":
                for press in presses.get(ratio, []):
                    if "error" in press:
                        lines.append(f"| {target} | | | | | {press['press']} | {press['error']} | |")
                    else:
                        lines.append(f"| {target} | | | | | {press['press']} | {press['ppl']:.2f} | "
                                     f"{press['greedy_agreement']:.2f} |")
        if kvpress is not None:
            none = next(r for r in kvpress["rows"] if r["press"] == "none")
            lines += ["", f"kvpress {kvpress.get('kvpress')} (transformers 5.2, its own venv), no press: perplexity "
                      f"{none['ppl']:.2f}. Its presses keep full-precision K/V: the fraction of tokens removed is "
                      "the fraction of KV bytes removed."]
    if "memory" in results:
        lines += ["", "## Memory: chunked prefill (512 a chunk) then 8 decode steps, one process each", "",
                  "| context | cache | KV state MiB (held after) | / fp16 | peak tensor MiB |", "|---|---|---|---|---|"]
        for context in sorted({r["context"] for r in results["memory"]}):
            rows = [r for r in results["memory"] if r["context"] == context]
            fp16 = next(r["live_after"] for r in rows if r["policy"] == "FullKV fp16")
            for r in rows:
                lines.append(f"| {context} | {r['policy']} | {r['live_after'] / 2**20:.1f} | "
                             f"{r['live_after'] / fp16:.3f} | {r['peak'] / 2**20:.1f} |")
    if "latency" in results:
        lines += ["", "## Decode step latency (median of 7, ms)", "", "| context | cache | ms/step | / fp16 cache |",
                  "|---|---|---|---|"]
        for context in sorted({r["context"] for r in results["latency"]}):
            rows = [r for r in results["latency"] if r["context"] == context]
            fp16 = next(r["ms"] for r in rows if r["policy"] == "FullKV fp16")
            lines += [f"| {context} | {r['policy']} | {r['ms']:.1f} | {r['ms'] / fp16:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sections", nargs="*", default=["accuracy", "memory", "latency"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--kvpress", type=Path, help="bench/kv_kvpress.py's JSON, shown beside the accuracy")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier JSON results to include")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child[0], int(args.memory_child[1]))))
        return
    results: dict[str, Any] = {"fxpress": fxpress.__version__, "torch": torch.__version__}
    for path in args.merge:
        results.update(json.loads(path.read_text()))
    args.sections = [s for s in args.sections if s != "none"]
    model = tokenizer = None
    if {"accuracy", "latency"} & set(args.sections):
        model, tokenizer = workloads.load_smollm2()
    if "accuracy" in args.sections:
        results["accuracy"] = accuracy(model, tokenizer)
    if "memory" in args.sections:
        results["memory"] = memory(args.contexts)
    if "latency" in args.sections:
        results["latency"] = latency(model, tokenizer, args.contexts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        kvpress = json.loads(args.kvpress.read_text()) if args.kvpress else None
        args.markdown.write_text(render(results, kvpress))


if __name__ == "__main__":
    main()
