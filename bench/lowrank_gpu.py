"""bench/lowrank.py's BERT-base comparison on a CUDA GPU: fxpress's triton target, peak memory by
``torch.cuda.max_memory_allocated`` and latency by ``triton.testing.do_bench`` (median).

Variants, batch 16: dense and unfused low-rank in eager, unfused and fused through fxpress
(``target="triton"``, strict). Peak = max allocated during one call minus what was allocated before
it, plus the arena fxpress holds between calls; the output counts.

Run: ``python bench/lowrank_gpu.py [--seqs 128 512 2048] [--markdown PATH]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fxpress  # noqa: E402
from bench.lowrank import BATCH, RANK_RATIO, _bert_base  # noqa: E402

MiB = 1 << 20


def _run(model: Any, kwargs: dict, fused: bool | None) -> dict[str, Any]:
    reports: list[Any] = []
    fn = model
    if fused is not None:
        options = fxpress.Options(target="triton", strict=True, disable=[] if fused else ["fuse_low_rank"])
        torch._dynamo.reset()
        fn = torch.compile(model, backend=fxpress.Backend(options, on_report=reports.append))
    call = lambda: fn(**kwargs).last_hidden_state  # noqa: E731
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(call, warmup=100, rep=500, return_mode="median")
    plan = reports[-1].plan if reports else {}
    arena = plan.get("arena_bytes", 0)
    return {"out": out, "peak": peak + arena, "arena": arena, "ms": ms,
            "not_generated": len(reports[-1].not_generated) if reports else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    dense = _bert_base().cuda()
    low_rank = fxpress.compress.svd(_bert_base(), rank_ratio=RANK_RATIO, targets="encoder.*").model.cuda()
    lines = ["| seq | peak dense eager | peak unfused eager | peak unfused fxpress | peak fused fxpress "
             "| **fused/unfused eager** | arena unfused | arena fused | ms dense eager | ms unfused eager "
             "| ms unfused fxpress | ms fused fxpress | max abs fused-unfused |", "|" + "---|" * 13]
    for seq in args.seqs:
        ids = torch.randint(0, 30000, (BATCH, seq), generator=torch.Generator().manual_seed(seq)).cuda()
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        r = {"dense": _run(dense, kwargs, None), "unfused": _run(low_rank, kwargs, None),
             "unfused_fx": _run(low_rank, kwargs, False), "fused_fx": _run(low_rank, kwargs, True)}
        diff = (r["fused_fx"]["out"] - r["unfused"]["out"]).abs().max().item()
        print(seq, {k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in r.items()}, flush=True)
        mib = lambda k, f="peak": f"{r[k][f] / MiB:.1f}"  # noqa: E731
        lines.append(f"| {seq} | {mib('dense')} | {mib('unfused')} | {mib('unfused_fx')} | {mib('fused_fx')} "
                     f"| **{r['fused_fx']['peak'] / r['unfused']['peak']:.3f}** | {mib('unfused_fx', 'arena')} "
                     f"| {mib('fused_fx', 'arena')} | {r['dense']['ms']:.2f} | {r['unfused']['ms']:.2f} "
                     f"| {r['unfused_fx']['ms']:.2f} | {r['fused_fx']['ms']:.2f} | {diff:.2e} |")
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, fp32, "
            f"BERT-base shape (random weights, {RANK_RATIO:.0%} of encoder Linear weights), batch {BATCH}. "
            "Memory in MiB, latency in ms.\n\n" + "\n".join(lines))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
