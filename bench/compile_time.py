"""Compile time of fxpress vs Inductor, and latency of fxpress's cpu target vs eager and Inductor.

Workloads (real models, fp32, CPU): MiniLM forward at batch 8 x 128, and one SmolLM2 decode step
with a StaticCache after a 128-token prefill. Everything is measured side by side in one process.
Compile time is the first call minus a steady-state call; Inductor runs with its on-disk caches off
so it compiles cold, as fxpress does. Latency is the median of repeated calls.

Run: ``python bench/compile_time.py [--repeats N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any, Callable

import torch
from transformers import StaticCache

import fxpress  # noqa: F401  (registers nothing global; the backend is found by name)
from fxpress import workloads
from fxpress.hf.cache_argument import cache_argument

BACKENDS = ("eager", "fxpress", "inductor")


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(make_call: Callable[[str], Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """For each backend: first-call seconds, steady median seconds, and compile = first - steady."""
    out = {}
    for name in BACKENDS:
        torch._dynamo.reset()
        call = make_call(name)
        with torch.no_grad():
            first = _timed(call)
            steady = statistics.median(_timed(call) for _ in range(repeats))
        out[name] = {"first_s": first, "latency_s": steady, "compile_s": max(first - steady, 0.0)}
    return out


def _compile(model: Any, name: str) -> Any:
    return model if name == "eager" else torch.compile(model, backend=name)


def minilm_forward() -> Callable[[str], Callable[[], Any]]:
    model, tokenizer = workloads.load_minilm()
    text = workloads.lee_background().splitlines()[:8]
    batch = tokenizer(text, padding="max_length", truncation=True, max_length=128, return_tensors="pt")

    def make_call(name: str) -> Callable[[], Any]:
        fn = _compile(model, name)
        return lambda: fn(**batch)

    return make_call


def smollm2_decode_step(prefill: int = 128, steps: int = 64) -> Callable[[str], Callable[[], Any]]:
    model, tokenizer = workloads.load_smollm2()
    ids = tokenizer(workloads.lee_background(), return_tensors="pt").input_ids[:, :prefill]
    cache = StaticCache(config=model.config, max_cache_len=prefill + steps)
    with torch.no_grad():
        token = model(ids, **cache_argument(cache)).logits[:, -1:].argmax(-1)

    def make_call(name: str) -> Callable[[], Any]:
        fn, own_cache = _compile(model, name), copy.deepcopy(cache)
        return lambda: fn(token, **cache_argument(own_cache))

    return make_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args()
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.autotune_local_cache = False
    torch.set_num_threads(torch.get_num_threads())

    results = {
        "MiniLM forward 8x128": measure(minilm_forward(), args.repeats),
        "SmolLM2 decode step": measure(smollm2_decode_step(steps=2 * args.repeats + 8), args.repeats),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, medians of {args.repeats}")
    print(f"{'workload':<22} {'compile fxpress':>15} {'compile inductor':>16} {'ratio':>6}   "
          f"{'eager':>8} {'fxpress':>8} {'inductor':>8} {'fxpress/eager':>13} {'inductor/eager':>14}")
    for workload, r in results.items():
        e, f, i = (r[b] for b in BACKENDS)
        print(f"{workload:<22} {f['compile_s']:>14.2f}s {i['compile_s']:>15.2f}s "
              f"{f['compile_s'] / i['compile_s']:>6.2f}   {e['latency_s'] * 1e3:>6.1f}ms "
              f"{f['latency_s'] * 1e3:>6.1f}ms {i['latency_s'] * 1e3:>6.1f}ms "
              f"{f['latency_s'] / e['latency_s']:>13.2f} {i['latency_s'] / e['latency_s']:>14.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
