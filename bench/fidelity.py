"""How much accuracy SVD compression keeps: plain truncated SVD against activation-aware SVD (the
layers' inputs on calibration data whiten each weight first), at the same parameter count, one
rank ratio for every layer.

Sections:

- ``smollm2``: SmolLM2-135M with every attention and MLP projection factored, 20 % of all its
  parameters gone (``params_kept=0.8``); calibrated on 8 x 256 tokens of lee_background from token
  8192 on; perplexity of its first 1024 tokens (never calibrated on) against the fp32 model's;
- ``minilm``: all-MiniLM-L6-v2's encoder factored at ``rank_ratio=0.5``; calibrated on
  64 lee_background sentences from the 100th; mean cosine of the sentence embeddings (mean
  pooling) of 64 other sentences to the dense model's.

Run: ``python bench/fidelity.py [smollm2] [minilm] [--json PATH]``
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import run_sections  # noqa: E402

from fxpress import compress, workloads  # noqa: E402
from fxpress.hf.perplexity import perplexity  # noqa: E402


def _report(name: str, rows: list[dict[str, Any]], measure: str) -> None:
    print(f"\n{name}\n\n| variant | parameters kept | {measure} | vs dense |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['kept']:.3f} | {r['value']:.4f} | {r['ratio']:.3f} |")


@torch.no_grad()
def smollm2() -> list[dict[str, Any]]:
    model, tokenizer = workloads.load_smollm2()
    ids = tokenizer(workloads.lee_background(), return_tensors="pt")["input_ids"]
    scored = ids[:, :1024]
    calibration = [{"input_ids": ids[:, 8192 + 256 * i:8192 + 256 * (i + 1)], "use_cache": False} for i in range(8)]
    dense = perplexity(model, scored)
    rows = [{"variant": "fp32", "kept": 1.0, "value": dense, "ratio": 1.0}]
    for variant, batches in (("SVD", None), ("activation-aware SVD", calibration)):
        result = compress.svd(model, params_kept=0.8, targets="*layers*", calibration=batches)
        value = perplexity(result.model, scored)
        rows.append({"variant": variant, "kept": result.kept, "value": value, "ratio": value / dense})
    _report("SmolLM2-135M, 20 % of parameters removed by SVD: perplexity on 1024 tokens",
            rows, "perplexity")
    return rows


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
    _report("all-MiniLM-L6-v2, encoder factored at rank_ratio 0.5: embedding cosine to dense, 64 sentences",
            rows, "mean cosine")
    return rows


if __name__ == "__main__":
    run_sections({"smollm2": smollm2, "minilm": minilm})
