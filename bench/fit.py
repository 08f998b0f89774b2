"""``fxpress.fit`` on SmolLM2-135M at 50 %, 35 % and 25 % of its fp16 bytes (weights + the KV state
of one 4096-token sequence), against uniform choices of the same budget.

Budget: 2 bytes per parameter (the tied embedding once) plus an fp16 cache of 4096 tokens (30
layers x 2 x 3 KV heads x 64 x 2 bytes a token). Every plan is judged the same way: the targeted
layers (every Linear of the decoder layers, and the tied embedding; the norms stay fp16) are
measured once (``fxpress.hf.fit.measure``: groups of 192, which divide 576 and 1536,
round-to-nearest at 8, 4, 3 and 2 bits, activation-aware SVD at half and a quarter of each
Linear's parameters), then each planner goes through ``best_plan``: for every KV policy whose
state fits, the planner spends what is left, and the policy with the lowest calibration perplexity
wins. Planners: the fit (greedy by error per byte) and each uniform choice (every layer at 4 or 3
bits, with the embedding at the same bits or fp16; or every Linear at half its parameters by SVD
beside an fp16 embedding), which either fits beside some KV policy or does not. KV candidates:
full, KIVI-4, KIVI-2, ThinK 0.5 + KIVI-2, and the first 4 plus the last 1020 tokens as 4-bit codes.

Calibration: 4096 tokens of lee_background from token 8192 on (16 batches of 256 for the Gram
matrices; together for judging KV policies). Scored: tokens 0 to 4096 of lee_background (never
calibrated on), the first 3072 through the plan's compressed cache, perplexity of the last 1024.

Run: ``python bench/fit.py --json PATH --markdown PATH [--measured CACHE.pt] [--planners NAME ...]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import fxpress
from fxpress import workloads
from fxpress.core.errors import OptionError
from fxpress.hf.fit import RANK_RATIOS, best_plan, fit, kv_bytes, measure
from fxpress.hf.kv_cache import kv_cache
from fxpress.hf.perplexity import perplexity

KV_TOKENS, BUDGETS, GROUP = 4096, (0.5, 0.35, 0.25), 192
# fxpress.fit's default candidates less the 2048-token window (to keep the run near half an hour)
POLICIES = [fxpress.FullKV(), fxpress.KIVI(bits=4), fxpress.KIVI(bits=2),
            fxpress.ThinKV(ratio=0.5, kivi=fxpress.KIVI(bits=2)), fxpress.StreamingKV(sink=4, recent=1020, bits=4)]


def uniform(kind: str, value: Any, embedding: bool = True):
    """A planner storing every layer as ``kind``/``value`` (a rank ratio's own rank per layer); the
    embedding at the same bits (``embedding``), else, and under a rank (it has no SVD option), dense."""
    def plan(measured, weight_budget: int):
        chosen = {}
        for name, options in measured.options.items():
            if measured.embedding is not None and name == measured.embedding[0] and not embedding:
                chosen[name] = next(o for o in options if o.kind == "dense")
            elif kind == "bits":
                chosen[name] = next(o for o in options if o.kind == "bits" and o.value == value)
            elif not any(o.kind == "rank" for o in options):
                chosen[name] = next(o for o in options if o.kind == "dense")
            else:
                ranks = sorted((o for o in options if o.kind == "rank"), key=lambda o: -o.nbytes)
                chosen[name] = ranks[RANK_RATIOS.index(value)]
        return chosen if sum(o.nbytes for o in chosen.values()) <= weight_budget else None
    return plan


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--measured", type=Path, help="keep step 1 here (a pickle this script wrote) and reuse it")
    parser.add_argument("--planners", nargs="*", help="only these planners (their names in the table)")
    args = parser.parse_args()
    model, tokenizer = workloads.load_smollm2()
    ids = tokenizer(workloads.lee_background(), return_tensors="pt").input_ids
    scored = ids[:, :KV_TOKENS]
    calibration = [{"input_ids": ids[:, 8192 + 256 * i:8192 + 256 * (i + 1)], "use_cache": False} for i in range(16)]
    fp16 = 2 * sum(p.numel() for p in model.parameters()) + kv_bytes(model, fxpress.FullKV(), KV_TOKENS)
    start = time.perf_counter()
    if args.measured is not None and args.measured.exists():
        measured = torch.load(args.measured, weights_only=False)  # this script's own file
    else:
        measured = measure(model, calibration, KV_TOKENS, targets="*layers*", group_size=GROUP)
        if args.measured is not None:
            torch.save(measured, args.measured)
    print(f"measured {len(measured.options)} layers in {time.perf_counter() - start:.0f} s", flush=True)
    dense_ppl = perplexity(model, scored, 3 * KV_TOKENS // 4, kv_cache(model, KV_TOKENS, fxpress.FullKV()))
    planners = {"fxpress.fit": None, "all 4-bit": uniform("bits", 4), "all 3-bit": uniform("bits", 3),
                "all 4-bit, fp16 embedding": uniform("bits", 4, embedding=False),
                "all 3-bit, fp16 embedding": uniform("bits", 3, embedding=False), "all rank 0.5": uniform("rank", 0.5)}
    if args.planners:
        planners = {name: planners[name] for name in args.planners}
    rows = []
    for fraction in BUDGETS:
        budget = fraction * fp16
        for name, planner in planners.items():
            try:
                if planner is None:
                    result = fit(model, budget, calibration, KV_TOKENS, measured=measured, kv_policies=POLICIES)
                else:
                    result = best_plan(measured, budget, lambda left, p=planner: p(measured, left), POLICIES)
            except OptionError:
                rows.append({"budget": fraction, "plan": name, "fits": False})
                print(f"  {fraction:.2f} {name:16s} does not fit", flush=True)
                continue
            ppl = perplexity(result.model, scored, 3 * KV_TOKENS // 4, kv_cache(result.model, KV_TOKENS, result.kv))
            kinds: dict[str, int] = {}
            for option in result.plan.values():
                kinds[option.describe()] = kinds.get(option.describe(), 0) + 1
            rows.append({"budget": fraction, "plan": name, "fits": True, "bytes": result.total_bytes / fp16,
                         "kv": result.kv.describe(), "layers": kinds, "ppl": ppl, "ratio": ppl / dense_ppl})
            print(f"  {fraction:.2f} {name:16s} bytes {result.total_bytes / fp16:.3f} ppl {ppl:8.2f} "
                  f"({ppl / dense_ppl:.3f}x) KV {result.kv.describe()} {kinds}", flush=True)
            if planner is None:
                print(result, flush=True)
    results = {"fxpress": fxpress.__version__, "torch": torch.__version__, "fp16_bytes": fp16,
               "dense_ppl": dense_ppl, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    lines = [f"fp16 bytes (weights + 4096-token KV): {fp16 / 2**20:.1f} MiB; fp32 model with a full cache: "
             f"perplexity {dense_ppl:.2f}", "",
             "| budget | plan | bytes / fp16 | KV policy | layers | perplexity | / dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['budget']:.0%} | {r['plan']} | does not fit | | | | |")
            continue
        layers = ", ".join(f"{n} {k}" for k, n in r["layers"].items())
        lines.append(f"| {r['budget']:.0%} | {r['plan']} | {r['bytes']:.3f} | {r['kv']} | {layers} | "
                     f"{r['ppl']:.2f} | {r['ratio']:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
