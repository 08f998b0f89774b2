"""Compressed KV caches on the real SmolLM2-135M: generate() with KIVI, StreamingLLM and H2O caches.

Two ways in:

1. ``fxpress.kv_cache(model, max_len, policy)`` builds a transformers cache that stores K/V
   compressed and never allocates a full-precision cache; pass it to ``generate``.
2. ``torch.compile(model, backend=fxpress.backend(kv=policy))`` on a model that keeps its cache in
   fixed buffers (HF StaticCache): the ``compress_kv_cache`` pass rewrites each layer's cache update
   and attention into ``fxpress::kv_attend`` over compressed state.

Run: ``python examples/kv_cache.py``
"""

import torch
from transformers import StaticCache

import fxpress
from fxpress import workloads
from fxpress.hf.cache_argument import cache_argument

model, tokenizer = workloads.load_smollm2()
prompt = tokenizer(workloads.lee_background()[:2400], return_tensors="pt").input_ids
n, new = prompt.shape[1], 24


def generate(cache=None):
    with torch.no_grad():
        return model.generate(prompt, **cache_argument(cache), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)[0, n:]


reference = generate()
print(f"prompt: {n} tokens of lee_background; reference continuation: {tokenizer.decode(reference)!r}")
fp16 = fxpress.kv_cache(model, n + new, fxpress.FullKV())
generate(fp16)
for policy in (fxpress.KIVI(bits=4), fxpress.KIVI(bits=2), fxpress.StreamingKV(sink=4, recent=252),
               fxpress.HeavyHitterKV(budget=256, recent=128)):
    cache = fxpress.kv_cache(model, n + new, policy)
    out = generate(cache)
    agree = (out == reference).float().mean().item()
    print(f"{policy.describe():45s} KV bytes {cache.nbytes() / 2**20:5.2f} MiB "
          f"({cache.nbytes() / fp16.nbytes():.2f} of fp16); greedy agreement {agree:.2f}")

# The same policies through the compiler, on a model written for a plain StaticCache.
model.set_attn_implementation("sdpa")
eager_forward = model.forward
model.forward = torch.compile(eager_forward, backend=fxpress.backend(kv=fxpress.FullKV()))
out = generate(StaticCache(config=model.config, max_cache_len=n + new))
model.forward = eager_forward
print("compress_kv_cache:", dict(fxpress.counters["compress_kv_cache"]),
      f"; FullKV tokens identical to eager: {torch.equal(out, reference)}")
