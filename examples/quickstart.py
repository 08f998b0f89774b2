"""Quickstart: compile two real models with fxpress and check them against eager.

1. all-MiniLM-L6-v2 (BERT encoder): sentence embeddings of real news text.
2. SmolLM2-135M-Instruct (Llama decoder, GQA): a chat prompt, prefill plus 32 greedy tokens
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


def smollm2() -> None:
    model, tokenizer = workloads.load_smollm2()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    max_len = input_ids.shape[1] + NEW_TOKENS

    def generate() -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        with torch.no_grad():
            return model.generate(input_ids, past_key_values=cache, max_new_tokens=NEW_TOKENS,
                                  do_sample=False, min_new_tokens=NEW_TOKENS)

    eager_tokens = generate()
    eager_forward = model.forward
    model.forward = torch.compile(model.forward, backend="fxpress")
    fxpress_tokens = generate()
    model.forward = eager_forward

    # Explain one decode step against a cache already filled by the prompt.
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():
        model(input_ids, past_key_values=cache)
    step = eager_tokens[:, input_ids.shape[1]:input_ids.shape[1] + 1]
    report = fxpress.explain(model, step, kwargs=dict(past_key_values=copy.deepcopy(cache)))
    print(report)

    text = tokenizer.decode(fxpress_tokens[0, input_ids.shape[1]:], skip_special_tokens=True)
    same = torch.equal(eager_tokens, fxpress_tokens)
    print(f"\nSmolLM2 answer: {text!r}")
    print(f"SmolLM2 {NEW_TOKENS} greedy tokens identical to eager: {same}; decode-step max "
          f"|fxpress - eager| = {report.max_abs_diff:.3g}")


if __name__ == "__main__":
    minilm()
    smollm2()
