"""The kvpress side of bench/kv.py's accuracy table, on the same tokens and the same protocol.

kvpress 0.5.5 pins transformers < 5.3, so this runs in a venv of its own and imports nothing from
fxpress (the model folder and the corpus file are arguments):

    python -m venv kvpress-venv && kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 transformers==5.2.0
    kvpress-venv/bin/python bench/kv_kvpress.py --model ~/.cache/fxpress/smollm2-135m-instruct-fp32 \\
        --text <gensim>/test/test_data/lee_background.cor --json bench/results/kvpress-cpu-DATE.json

Protocol (as in bench/kv.py): the first 1280 tokens of lee_background; the press compresses the
1024-token prefix at prefill; the next 256 tokens are scored in one forward (positions continue from
1024, as kvpress's own pipeline passes them); then a fresh compressed prefix is continued greedily
for 64 tokens and compared position by position with the uncompressed continuation. kvpress's
``compression_ratio`` is the fraction of prefix tokens removed; its cache holds full-precision
keys and values, so that is also the fraction of KV bytes removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from fxpress.hf.cache_argument import cache_argument
from fxpress.hf.perplexity import perplexity

PREFIX, SCORED, GENERATED = 1024, 256, 64


@torch.no_grad()
def run(model, ids, press):
    ppl = perplexity(model, ids[:, :PREFIX + SCORED], PREFIX, DynamicCache(),
                     prefill=press(model) if press is not None else None)
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        logits = model(ids[:, :PREFIX], **cache_argument(cache)).logits[:, -1]
    tokens = [logits.argmax(-1)]
    for i in range(GENERATED - 1):
        logits = model(tokens[-1][:, None], **cache_argument(cache), position_ids=torch.tensor([[PREFIX + i]])).logits[:, -1]
        tokens.append(logits.argmax(-1))
    return ppl, torch.stack(tokens, 1)


def main() -> None:
    import kvpress

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--think", action="store_true",
                        help="ThinKPress alone at key-channel ratios 0.4, 0.5, 0.75 (bench/kv_think.py's rows)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids[:, :PREFIX + SCORED]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    eager = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    ppl, reference = run(model, ids, None)
    rows = [{"press": "none", "compression_ratio": 0.0, "ppl": ppl, "greedy_agreement": 1.0}]
    print(f"none ppl {ppl:.2f}", flush=True)
    presses = {
        "StreamingLLMPress": lambda r: kvpress.StreamingLLMPress(compression_ratio=r, n_sink=4),
        "ObservedAttentionPress (H2O)": lambda r: kvpress.ObservedAttentionPress(compression_ratio=r),
        "SnapKVPress": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "KnormPress": lambda r: kvpress.KnormPress(compression_ratio=r),
        "ExpectedAttentionPress": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
        "TOVAPress": lambda r: kvpress.TOVAPress(compression_ratio=r),
    }
    if args.think:
        for ratio in (0.4, 0.5, 0.75):
            ppl, out = run(model, ids, kvpress.ThinKPress(key_channel_compression_ratio=ratio))
            agreement = (out == reference).float().mean().item()
            rows.append({"press": f"ThinKPress({ratio})", "key_channel_ratio": ratio, "ppl": ppl,
                         "greedy_agreement": agreement})
            print(f"ThinKPress {ratio:.2f} ppl {ppl:.2f} agree {agreement:.3f}", flush=True)
        presses = {}
    for ratio in (0.5, 0.75):
        for name, make in presses.items():
            target = eager if "Observed" in name else model  # it needs attention probabilities
            try:
                ppl, out = run(target, ids, make(ratio))
            except Exception as error:  # a press that does not run here is reported, not hidden
                rows.append({"press": name, "compression_ratio": ratio, "error": f"{type(error).__name__}: {error}"})
                print(f"{name} {ratio}: {rows[-1]['error']}", flush=True)
                continue
            agreement = (out == reference).float().mean().item()
            rows.append({"press": name, "compression_ratio": ratio, "ppl": ppl, "greedy_agreement": agreement})
            print(f"{name:30s} {ratio:.2f} ppl {ppl:.2f} agree {agreement:.3f}", flush=True)
    result = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
              "torch": torch.__version__, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
