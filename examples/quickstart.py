"""Quickstart: compile two real models with fxpress and check them against eager.

1. all-MiniLM-L6-v2 (BERT encoder): sentence embeddings of real news text.
2. The same MiniLM compressed with ``fxpress.compress.svd`` (every encoder Linear factored to half its
   parameters, activation-aware): ``fuse_low_rank`` turns each layer's attention and FFN into
   streaming low-rank ops; the fused model is checked against the unfused one and the dense one.
3. SmolLM2-135M-Instruct (Llama decoder, GQA): a chat prompt, prefill plus 32 greedy tokens
   through ``generate()`` with a StaticCache, the compiled forward updating the cache in place.

For each it prints fxpress.explain's report and the largest difference to eager.
Run: ``python examples/quickstart.py`` (after ``bash scripts/setup.sh``).
"""

from __future__ import annotations

import copy

import torch
from transformers import StaticCache

import fxpress
from fxpress import workloads
from fxpress.hf.cache_argument import cache_argument

NEW_TOKENS = 32


def minilm() -> None:
    model, tokenizer = workloads.load_minilm()
    sentences = [line[:400] for line in workloads.lee_background().splitlines()[:8]]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")

    report = fxpress.explain(model, kwargs=dict(batch))
    print(report)

    compiled = torch.compile(model, backend="fxpress")
    with torch.no_grad():
        eager = model(**batch).last_hidden_state
        ours = compiled(**batch).last_hidden_state
    print(f"\nMiniLM {tuple(batch['input_ids'].shape)}: max |fxpress - eager| = "
          f"{(ours - eager).abs().max().item():.3g}\n")


def _mean_pooled(model, batch) -> torch.Tensor:
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)


def _arena_mib(model, batch, disable=()) -> float:
    reports = []
    backend = fxpress.Backend(fxpress.Options(disable=list(disable)), on_report=reports.append)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**batch)
    return reports[-1].plan["arena_bytes"] / 2**20


def low_rank_minilm() -> None:
    model, tokenizer = workloads.load_minilm()
    lines = workloads.lee_background().splitlines()
    encode = lambda texts: dict(tokenizer(texts, padding="max_length", truncation=True, max_length=128,
                                          return_tensors="pt"))
    calibration = [encode(lines[100 + 16 * i:116 + 16 * i]) for i in range(4)]  # not the test sentences
    with torch.no_grad():
        result = fxpress.compress.svd(model, rank_ratio=0.5, targets="encoder.*", calibration=calibration)
    compressed = result.model
    print(f"compress.svd: {len(result.ranks)} Linear layers factored, {result.params_before:,} -> "
          f"{result.params_after:,} parameters")

    batch = encode([line[:400] for line in lines[:8]])
    print(fxpress.explain(compressed, kwargs=batch))
    with torch.no_grad():
        unfused = compressed(**batch).last_hidden_state
        fused = torch.compile(compressed, backend="fxpress")(**batch).last_hidden_state
        cosine = torch.nn.functional.cosine_similarity(_mean_pooled(model, batch), _mean_pooled(compressed, batch))
    print(f"\nlow-rank MiniLM: max |fused - unfused| = {(fused - unfused).abs().max().item():.3g}; "
          f"sentence-embedding cosine to the dense model = {cosine.mean().item():.3f}")
    print(f"planned activation memory: unfused {_arena_mib(compressed, batch, ['fuse_low_rank']):.1f} MiB, "
          f"fused {_arena_mib(compressed, batch):.1f} MiB\n")


def smollm2() -> None:
    model, tokenizer = workloads.load_smollm2()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    max_len = input_ids.shape[1] + NEW_TOKENS

    def generate() -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        with torch.no_grad():
            return model.generate(input_ids, **cache_argument(cache), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, min_new_tokens=NEW_TOKENS)

    eager_tokens = generate()
    eager_forward = model.forward
    model.forward = torch.compile(model.forward, backend="fxpress")
    fxpress_tokens = generate()
    model.forward = eager_forward

    # Explain one decode step against a cache already filled by the prompt.
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():
        model(input_ids, **cache_argument(cache))
    step = eager_tokens[:, input_ids.shape[1]:input_ids.shape[1] + 1]
    report = fxpress.explain(model, step, kwargs=cache_argument(copy.deepcopy(cache)))
    print(report)

    text = tokenizer.decode(fxpress_tokens[0, input_ids.shape[1]:], skip_special_tokens=True)
    same = torch.equal(eager_tokens, fxpress_tokens)
    print(f"\nSmolLM2 answer: {text!r}")
    print(f"SmolLM2 {NEW_TOKENS} greedy tokens identical to eager: {same}; decode-step max "
          f"|fxpress - eager| = {report.max_abs_diff:.3g}")


if __name__ == "__main__":
    minilm()
    low_rank_minilm()
    smollm2()
