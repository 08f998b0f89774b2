"""How much accuracy compression keeps: plain truncated SVD against activation-aware SVD (the
layers' inputs on calibration data whiten each weight first), at the same parameter count, with one
rank ratio for every layer or each layer's rank chosen by the measured sensitivity of the model's
output (``compress.svd``'s default with calibration); low-bit weights by round-to-nearest, BCQ and GPTQ.

Sections:

- ``smollm2``: SmolLM2-135M with every attention and MLP projection factored, 20 % of all its
  parameters gone (``params_kept=0.8``); calibrated on 192 x 256 tokens of lee_background from token
  2048 on (the measured allocation judges each layer on the first 256); perplexity of its first
  1024 tokens (never calibrated on) against the fp32 model's; last, the allocated ranks with the
  factors distilled towards the fp32 model on the calibration batches (``distill_epochs``);
- ``smollm2_weights``: SmolLM2-135M's decoder Linears at 4 and 3 bits (groups of 192, float16
  scales) by RTN, BCQ, GPTQ, activation-weighted BCQ and the calibrated default (AWQ-style input
  scaling, then GPTQ on the weighted BCQ grid), and the default with its scales then distilled
  (``distill_epochs``); perplexity as above;
- ``smollm2_kv``: SmolLM2-135M's KV cache by KIVI at 4 and 2 bits, keys plain, rotated
  (``KIVI(rotate=True)``) and quantised before the rotary embedding (``KIVI(rope_theta=...)``),
  windows of 128 and 32 tokens, and the paper's KIVI-2; for each of three
  Wikipedia articles (``workloads.wikipedia_article``: text no other workload uses), a 1536-token
  prefix, then the perplexity of the next 256 tokens against an uncompressed cache, and the cache's
  bytes at the prefix as a fraction of an fp16 cache's; last, each policy's geometric mean ratio;
- ``minilm``: all-MiniLM-L6-v2's encoder factored at ``rank_ratio=0.5``, and with ranks allocated
  by measured sensitivity at the same parameter count; calibrated on 64 lee_background articles
  from the 100th (their first 128 tokens; the allocation judges each layer on the first 16); mean
  cosine of the sentence embeddings (mean pooling) of 64 other articles to the dense model's; last,
  the allocated ranks (whitened on the calibration articles) distilled, every layer's hidden state
  matched, on every article from the 64th cut into windows of 90 words and on 8 texts SmolLM2-135M
  writes from each of those articles' first 12 words (the first 90 words of each text).

Run: ``python bench/fidelity.py [smollm2] [smollm2_weights] [smollm2_kv] [minilm] [--json PATH]``
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import run_sections  # noqa: E402

from fxpress import compress, workloads  # noqa: E402
from fxpress.hf.perplexity import perplexity  # noqa: E402

WEIGHT_GROUP = 192  # divides SmolLM2's 576 and 1536 inputs
SVD_BATCHES = 192  # x 256 tokens: with 8 the whitened SVD alone kept 2.41x, with 192 1.93x
SVD_DISTILL_EPOCHS = 3
WEIGHT_DISTILL_EPOCHS = 4
MINILM_DISTILL_EPOCHS = 14
MINILM_DISTILL_LR = 3e-4  # measured against 1e-4, 6e-4 and 1e-3 with every layer matched
MINILM_WRITTEN = 8  # texts SmolLM2 writes from each training article's opening words
ALLOCATED = "ranks by measured sensitivity"


def _report(name: str, rows: list[dict[str, Any]], measure: str, kept: str = "parameters kept") -> None:
    print(f"\n{name}\n\n| variant | {kept} | {measure} | vs dense |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['kept']:.3f} | {r['value']:.4f} | {r['ratio']:.3f} |")


def _smollm2_text(batches: int, start: int) -> tuple[Any, torch.Tensor, list[dict[str, Any]], float]:
    """SmolLM2, the 1024 scored tokens, ``batches`` x 256 calibration tokens from token ``start`` on,
    and the model's own perplexity."""
    model, tokenizer = workloads.load_smollm2()
    ids = tokenizer(workloads.lee_background(), return_tensors="pt")["input_ids"]
    scored = ids[:, :1024]
    calibration = [{"input_ids": ids[:, start + 256 * i:start + 256 * (i + 1)], "use_cache": False}
                   for i in range(batches)]
    return model, scored, calibration, perplexity(model, scored)


@torch.no_grad()
def smollm2() -> list[dict[str, Any]]:
    model, scored, calibration, dense = _smollm2_text(SVD_BATCHES, start=2048)
    rows = [{"variant": "fp32", "kept": 1.0, "value": dense, "ratio": 1.0}]
    for variant, batches, allocation in (("SVD", None, "uniform"),
                                         ("activation-aware SVD, one ratio", calibration, "uniform"),
                                         (f"activation-aware SVD, {ALLOCATED}", calibration, "measured")):
        result = compress.svd(model, params_kept=0.8, targets="*layers*", calibration=batches, allocation=allocation)
        value = perplexity(result.model, scored)
        rows.append({"variant": variant, "kept": result.kept, "value": value, "ratio": value / dense})
    # The same ranks, the factors then distilled towards the fp32 model on the calibration batches.
    result = compress.svd(model, rank=result.ranks, targets="*layers*", calibration=calibration,
                          distill_epochs=SVD_DISTILL_EPOCHS)
    value = perplexity(result.model, scored)
    rows.append({"variant": f"activation-aware SVD, {ALLOCATED}, distilled {SVD_DISTILL_EPOCHS} epochs",
                 "kept": result.kept, "value": value, "ratio": value / dense})
    _report("SmolLM2-135M, 20 % of parameters removed by SVD: perplexity on 1024 tokens",
            rows, "perplexity")
    return rows


@torch.no_grad()
def smollm2_weights() -> list[dict[str, Any]]:
    """Low-bit weights for every Linear of the decoder layers at 4 and 3 bits in groups of 192 (which
    divide SmolLM2's 576 and 1536 inputs: no padded columns), float16 scales: RTN, BCQ, GPTQ, BCQ
    weighted by the calibration inputs' energy per column, and the calibrated default (AWQ-style
    input scaling, then GPTQ on the weighted BCQ grid); calibrated on 32 x 256 tokens from token
    8192 on (with 8 x 256, GPTQ fitted the 1536-input down_proj's inputs too closely to
    help on other text)."""
    model, scored, calibration, dense = _smollm2_text(32, start=8192)
    rows = [{"variant": "fp32 (the GGUF Q4_1 weights, dequantised)", "kept": 32.0, "value": dense, "ratio": 1.0}]
    variants = (("RTN", "rtn", None), ("BCQ", "bcq", None), ("GPTQ", "gptq", calibration),
                ("BCQ, activation-weighted,", "bcq", calibration),
                ("AWQ scaling + GPTQ on the weighted BCQ grid (the default with calibration),", "gptq-bcq",
                 calibration),
                (f"the default, then scales distilled {WEIGHT_DISTILL_EPOCHS} epochs,", "gptq-bcq", calibration))
    for bits in (4, 3):
        for label, method, batches in variants:
            epochs = WEIGHT_DISTILL_EPOCHS if label.startswith("the default, then") else 0
            result = compress.quantize(model, bits=bits, group_size=WEIGHT_GROUP, method=method, targets="*layers*",
                                       calibration=batches, distill_epochs=epochs)
            value = perplexity(result.model, scored)
            per_weight = 8 * result.weight_bytes / (result.fp32_bytes / 4)
            rows.append({"variant": f"{label} {bits}-bit", "kept": per_weight, "value": value,
                         "ratio": value / dense})
            print(f"  {rows[-1]}", flush=True)
    _report(f"SmolLM2-135M, decoder Linears at low bit (groups of {WEIGHT_GROUP}, float16 scales): perplexity on "
            "1024 tokens", rows, "perplexity", kept="bits per weight, scales included")
    return rows


KV_PREFIX, KV_SCORED = 1536, 256
KV_ARTICLES = {1: "Anarchism", 142: "Alkali metal", 68: "Abraham Lincoln"}  # of workloads.WIKIPEDIA_DUMP


@torch.no_grad()
def smollm2_kv() -> list[dict[str, Any]]:
    from transformers import DynamicCache

    from fxpress.hf.cache_argument import cache_argument
    from fxpress.hf.kv_cache import kv_cache
    from fxpress.kv import KIVI

    model, tokenizer = workloads.load_smollm2()
    config = model.config
    fp16_bytes = 2 * config.num_key_value_heads * config.head_dim * 2 * config.num_hidden_layers * KV_PREFIX
    policies = {"KIVI-4": KIVI(bits=4), "KIVI-2": KIVI(bits=2), "KIVI-2 R=32": KIVI(bits=2, residual=32),
                "KIVI-2 as in the paper (sink 0, no key clipping)": KIVI(bits=2, sink=0, clip_keys=False)}
    theta = config.rope_parameters["rope_theta"]
    policies = {variant: p for name, policy in policies.items()
                for variant, p in ((name, policy), (f"{name}, rotated keys", dataclasses.replace(policy, rotate=True)),
                                   (f"{name}, pre-RoPE keys", dataclasses.replace(policy, rope_theta=theta)))}
    rows, ratios = [], {name: [] for name in policies}
    for index, title in KV_ARTICLES.items():
        ids = tokenizer(workloads.wikipedia_article(index), return_tensors="pt")["input_ids"][:, :KV_PREFIX + KV_SCORED]
        model.set_attn_implementation("sdpa")
        full = perplexity(model, ids, KV_PREFIX, DynamicCache(config=config))
        rows.append({"variant": f"{title}: uncompressed (DynamicCache, fp32)", "kept": 2.0, "value": full,
                     "ratio": 1.0})
        for name, policy in policies.items():
            measured = kv_cache(model, KV_PREFIX, policy)
            model(ids[:, :KV_PREFIX], **cache_argument(measured), logits_to_keep=1)
            value = perplexity(model, ids, KV_PREFIX, kv_cache(model, KV_PREFIX + KV_SCORED, policy))
            rows.append({"variant": f"{title}: {name}", "kept": measured.nbytes() / fp16_bytes, "value": value,
                         "ratio": value / full})
            ratios[name].append(value / full)
            print(f"  {rows[-1]}", flush=True)
    model.set_attn_implementation("sdpa")
    for name, values in ratios.items():  # the geometric mean over the articles
        mean = float(torch.tensor(values).log().mean().exp())
        rows.append({"variant": f"all three: {name}", "kept": float("nan"), "value": float("nan"), "ratio": mean})
    _report(f"SmolLM2-135M KV cache: perplexity of {KV_SCORED} tokens after a {KV_PREFIX}-token prefix, "
            f"Wikipedia articles {', '.join(KV_ARTICLES.values())}", rows, "perplexity",
            kept="KV bytes / fp16 at the prefix")
    return rows


@torch.no_grad()
def _written_by_smollm2(openings: list[str], samples: int, new_tokens: int = 110) -> list[str]:
    """``samples`` texts for each of ``openings``: the opening, then SmolLM2-135M's continuation,
    sampled (temperature 0.9, top-p 0.95) from a seed per sample round so that a run repeats."""
    model, tokenizer = workloads.load_smollm2()
    tokenizer.padding_side = "left"  # every row of a batch continues from its own last word
    texts = []
    for seed in range(samples):
        torch.manual_seed(seed)
        for i in range(0, len(openings), 48):
            batch = tokenizer(openings[i:i + 48], return_tensors="pt", padding=True)
            out = model.generate(**batch, do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            continuations = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            texts += [opening + text for opening, text in zip(openings[i:i + 48], continuations)]
        print(f"  SmolLM2 wrote {len(texts)} texts", flush=True)
    return texts


@torch.no_grad()
def minilm() -> list[dict[str, Any]]:
    model, tokenizer = workloads.load_minilm()
    sentences = workloads.lee_background().splitlines()
    encode = lambda lines: dict(tokenizer(lines, padding=True, truncation=True, max_length=128,  # noqa: E731
                                          return_tensors="pt"))
    calibration = [encode(sentences[100 + 16 * i:116 + 16 * i]) for i in range(4)]
    batch = encode(sentences[:64])
    weights = batch["attention_mask"].unsqueeze(-1).float()

    def embed(m) -> torch.Tensor:
        return (m(**batch).last_hidden_state * weights).sum(1) / weights.sum(1)

    reference = embed(model)
    cosine = lambda m: float(torch.nn.functional.cosine_similarity(embed(m), reference).mean())  # noqa: E731
    rows = [{"variant": "dense", "kept": 1.0, "value": 1.0, "ratio": 1.0}]
    for variant, batches in (("SVD", None), ("activation-aware SVD", calibration)):
        result = compress.svd(model, rank_ratio=0.5, targets="encoder.*", calibration=batches)
        value = cosine(result.model)
        rows.append({"variant": variant, "kept": result.kept, "value": value, "ratio": value})
    result = compress.svd(model, params_kept=result.kept, targets="encoder.*", calibration=calibration)
    value = cosine(result.model)
    rows.append({"variant": f"activation-aware SVD, {ALLOCATED}, as many parameters", "kept": result.kept,
                 "value": value, "ratio": value})
    # The same ranks, distilled on every article not scored (the calibration ones among them), cut
    # into windows of 90 words, and on texts SmolLM2 writes from their opening words: the factors
    # fit the corpus's 72 k tokens more closely than they generalise, so more text like it helps.
    windows = [" ".join(words[i:i + 90]) for words in (s.split() for s in sentences[64:])
               for i in range(0, len(words), 90) if len(words[i:i + 90]) > 20]
    openings = [" ".join(s.split()[:12]) for s in sentences[64:]]
    written = [" ".join(text.split()[:90]) for text in _written_by_smollm2(openings, MINILM_WRITTEN)]
    written = [text for text in written if len(text.split()) > 20]
    windows += written
    random.Random(0).shuffle(windows)  # batches of windows from many articles, not one article's
    distill_batches = [encode(windows[i:i + 16]) for i in range(0, len(windows), 16)]
    result = compress.svd(model, rank=result.ranks, targets="encoder.*", calibration=calibration,
                          distill_batches=distill_batches, distill_epochs=MINILM_DISTILL_EPOCHS,
                          distill_lr=MINILM_DISTILL_LR)
    value = cosine(result.model)
    rows.append({"variant": f"the same ranks, distilled {MINILM_DISTILL_EPOCHS} epochs on the corpus and "
                            f"{len(written)} texts SmolLM2 wrote", "kept": result.kept, "value": value, "ratio": value})
    _report("all-MiniLM-L6-v2, encoder factored at rank_ratio 0.5 (or its parameter count): embedding cosine to "
            "dense, 64 sentences", rows, "mean cosine")
    return rows


if __name__ == "__main__":
    run_sections({"smollm2": smollm2, "smollm2_weights": smollm2_weights, "smollm2_kv": smollm2_kv,
                  "minilm": minilm})
