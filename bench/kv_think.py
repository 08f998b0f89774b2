"""ThinK on the real SmolLM2-135M: fxpress's ``ThinKV`` beside kvpress's ``ThinKPress``.

Same protocol and tokens as ``bench/kv.py accuracy``: the first 1280 tokens of lee_background; a
cache built for the 1024-token prefix is prefilled and its bytes measured (every byte it holds:
pruned keys, the channel index, the full-channel window, values; fp16 storage), the next 256 tokens
are scored in one forward (perplexity), and 64 tokens are generated greedily from the prefix
(agreement with the uncompressed model). kvpress's ThinKPress zeroes the pruned key channels of a
full-width cache, so its bytes are nominal: ``1 - ratio / 2`` of fp16, the figure the table puts
it at. fxpress stores only the kept channels, so its bytes are measured.

Run: ``python bench/kv_think.py --json PATH --markdown PATH [--kvpress PATH]`` (``--merge OLD.json
--only NAME ...`` measures those policies again or anew beside the old rows), the kvpress side
``kvpress-venv/bin/python bench/kv_kvpress.py --think ... --json PATH`` (see that file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import fxpress
from fxpress import workloads
from fxpress.hf.perplexity import perplexity
from fxpress.kv import KIVI, FullKV, HeavyHitterKV, ThinKV

from kv import GENERATED, PREFIX, SCORED, corpus_ids, measure_policy

RATIOS = (0.4, 0.5, 0.75)


def policies() -> dict[str, Any]:
    runs: dict[str, Any] = {"full (fp16)": FullKV()}
    runs.update({f"ThinK {r}": ThinKV(ratio=r) for r in RATIOS})
    for bits in (4, 2):
        runs[f"KIVI-{bits}"] = KIVI(bits=bits)
        runs[f"ThinK 0.5 + KIVI-{bits}"] = ThinKV(ratio=0.5, kivi=KIVI(bits=bits))
    h2o = HeavyHitterKV(budget=496, recent=248)  # bench/kv.py's 50 % H2O
    runs["H2O"] = h2o
    runs["ThinK 0.5 + H2O"] = ThinKV(ratio=0.5, evict=h2o)
    return runs


@torch.no_grad()
def measure(model: Any, tokenizer: Any, only: list[str] | None = None) -> list[dict[str, Any]]:
    """The uncompressed reference row, then a row per policy (those named in ``only``, if given)."""
    ids = corpus_ids(tokenizer, 0, PREFIX + SCORED)
    model.set_attn_implementation("sdpa")
    from transformers import DynamicCache

    reference_ppl = perplexity(model, ids, PREFIX, DynamicCache(config=model.config))
    reference = model.generate(ids[:, :PREFIX], max_new_tokens=GENERATED, min_new_tokens=GENERATED,
                               do_sample=False)[:, PREFIX:]
    rows = [{"policy": "uncompressed (HF DynamicCache, fp32)", "kv_fraction": None, "ppl": reference_ppl,
             "greedy_agreement": 1.0}]
    rows += [measure_policy(model, ids, reference, name, policy) for name, policy in policies().items()
             if only is None or name in only]
    model.set_attn_implementation("sdpa")
    return rows


def render(rows: list[dict[str, Any]], kvpress: dict[str, Any] | None) -> str:
    lines = ["| cache | KV bytes / fp16 | perplexity | greedy agreement |", "|---|---|---|---|"]
    for row in rows:
        fraction = "-" if row["kv_fraction"] is None else f"{row['kv_fraction']:.3f}"
        lines.append(f"| fxpress {row.get('detail', row['policy'])} | {fraction} | {row['ppl']:.2f} | "
                     f"{row['greedy_agreement']:.2f} |")
    for row in (kvpress or {}).get("rows", []):
        if "ThinK" not in row["press"] and row["press"] != "none":
            continue
        nominal = 1 - row.get("key_channel_ratio", 0.0) / 2
        if "error" in row:
            lines.append(f"| kvpress {row['press']} | {nominal:.3f} (nominal) | {row['error']} | |")
        else:
            lines.append(f"| kvpress {row['press']} | {nominal:.3f} (nominal) | {row['ppl']:.2f} | "
                         f"{row['greedy_agreement']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--kvpress", type=Path, help="bench/kv_kvpress.py --think's JSON")
    parser.add_argument("--merge", type=Path, help="an earlier JSON of this script: render it (with --only, "
                                                       "its rows beside the new ones)")
    parser.add_argument("--only", nargs="+", choices=list(policies()), help="measure only these policies")
    args = parser.parse_args()
    results = json.loads(args.merge.read_text()) if args.merge else {"rows": []}
    if args.only or not args.merge:
        model, tokenizer = workloads.load_smollm2()
        rows = {r["policy"]: r for r in results["rows"]}
        rows.update({r["policy"]: r for r in measure(model, tokenizer, args.only)})  # new rows replace or follow
        results = {"fxpress": fxpress.__version__, "torch": torch.__version__, "rows": list(rows.values())}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    kvpress = json.loads(args.kvpress.read_text()) if args.kvpress else None
    table = render(results["rows"], kvpress)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
