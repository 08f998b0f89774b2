"""bench/lowrank.py's comparisons on a CUDA GPU: fxpress's triton target, peak memory by
``torch.cuda.max_memory_allocated`` and latency by ``triton.testing.do_bench`` (median).

Workloads (random weights, every decoder/encoder Linear factored at rank_ratio 0.5):

- BERT-base shape, batch 16 x seq (default 128, 512, 2048);
- SmolLM2-135M shape (a rotary decoder: 9 query / 3 KV heads of 64, SwiGLU FFN 1536, RoPE
  theta 1e5; 4 layers), batch 1, one prefill of 2048 tokens without a KV cache.

Each in every ``--dtypes`` (default float32; the goal ratios are the first dtype's).
Variants: dense and unfused low-rank in eager, unfused and fused through fxpress
(``target="triton"``, strict). Peak = max allocated during one call minus what was allocated before
it, plus the arena fxpress holds between calls; the output counts.

With ``--replay`` the fused model is timed again replayed as CUDA graphs (``cuda_graphs=True``),
with its output checked against the plain call's; ``--profile PATH`` writes the torch profiler's
kernel table of one fused and one unfused BERT-base call (the first dtype, at 512).

Run: ``python bench/lowrank_gpu.py [--seqs 128 512 2048] [--blocks 4 8 16 32] [--replay] [--profile PATH]
[--markdown PATH] [--json PATH]``; the JSON holds each goal ratio of fused fxpress over unfused eager
(not replayed) as one number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fxpress  # noqa: E402
from fxpress.ops.kernels import lowrank_library as library  # noqa: E402
from bench.lowrank import BATCH, RANK_RATIO, _bert_base  # noqa: E402

MiB = 1 << 20
BLOCKS_MIB = [4, 8, 16, 32]  # the library order's block sizes the fused model is also timed at (--blocks)
BLOCK_LINES: list[str] = []  # those timings, one row per workload and block size
REPLAY_LINES: list[str] = []  # with --replay: the fused model replayed as CUDA graphs
PROFILE_PARTS: list[str] = []  # with --profile: kernel tables


def _run(model: Any, kwargs: dict, fused: bool | None, replay: bool = False) -> dict[str, Any]:
    reports: list[Any] = []
    fn = model
    if fused is not None:
        options = fxpress.Options(target="triton", strict=True, disable=[] if fused else ["fuse_low_rank"],
                                  cuda_graphs=replay)
        torch._dynamo.reset()
        fn = torch.compile(model, backend=fxpress.Backend(options, on_report=reports.append))
    call = lambda: fn(**kwargs).last_hidden_state  # noqa: E731
    with torch.no_grad():
        call()
        result = _measure(call)
        if fused and not replay:  # the same compiled model with the library order's blocks at other sizes
            default = library.CUDA_BLOCK_BYTES
            try:
                for mib in BLOCKS_MIB:
                    library.CUDA_BLOCK_BYTES = mib * MiB
                    result[f"blocks {mib} MiB"] = _measure(call)
            finally:
                library.CUDA_BLOCK_BYTES = default
    plan = reports[-1].plan if reports else {}
    arena = plan.get("arena_bytes", 0)
    for value in [result, *(v for v in result.values() if isinstance(v, dict))]:
        value["peak"] += arena
    return {**result, "arena": arena, "not_generated": len(reports[-1].not_generated) if reports else None}


def _measure(call: Any) -> dict[str, Any]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"out": out, "peak": peak, "ms": triton.testing.do_bench(call, warmup=100, rep=500, return_mode="median")}


def _replayed(model: Any, kwargs: dict, workload: str, plain: dict[str, Any], unfused: dict[str, Any]) -> None:
    """The fused model replayed as CUDA graphs: one row of REPLAY_LINES (time only: a replay's
    buffers live in the graph's private pool, allocated at capture, which a call's peak misses)."""
    captured = fxpress.counters["cuda_graphs"]["captured"]
    r = _run(model, kwargs, True, replay=True)
    if fxpress.counters["cuda_graphs"]["captured"] == captured:
        raise RuntimeError(f"{workload}: not captured: {dict(fxpress.counters['cuda_graphs'])}")
    diff = (r["out"] - plain["out"]).abs().max().item()
    REPLAY_LINES.append(f"| {workload} | {plain['ms']:.2f} | {r['ms']:.2f} | {unfused['ms']:.2f} "
                        f"| **{r['ms'] / unfused['ms']:.3f}** | {diff:.1e} |")


def _profile(calls: dict[str, Any]) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, call in calls.items():
        with torch.no_grad():
            call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        PROFILE_PARTS.append(f"## {name}: {kernels} GPU kernels\n\n"
                             + events.table(sort_by="device_time_total", row_limit=25))


def _smollm2_shaped(layers: int = 4) -> Any:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, rms_norm_eps=1e-5,
                         max_position_embeddings=8192)
    return LlamaModel._from_config(config, attn_implementation="sdpa").eval()


def rotary_row(dtype: torch.dtype, seq: int = 2048, replay: bool = False) -> tuple[str, dict[str, float]]:
    """The SmolLM2-shaped decoder's row, and its two goal ratios."""
    dense = _smollm2_shaped().to("cuda", dtype)
    low_rank = fxpress.compress.svd(_smollm2_shaped(), rank_ratio=RANK_RATIO, targets="layers.*").model
    low_rank = low_rank.to("cuda", dtype)
    ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(seq)).cuda()
    kwargs = {"input_ids": ids, "use_cache": False}
    r = {"dense": _run(dense, kwargs, None), "unfused": _run(low_rank, kwargs, None),
         "unfused_fx": _run(low_rank, kwargs, False), "fused_fx": _run(low_rank, kwargs, True)}
    rotary = fxpress.counters["fuse_low_rank"].get(
        "low-rank Q, K (rotary), V -> sdpa [-> low-rank O] => lowrank_attention", 0)
    if rotary == 0:
        raise RuntimeError(f"no rotary attention fused: {dict(fxpress.counters['fuse_low_rank'])}")
    workload = f"SmolLM2 x4 layers, 1 x {seq}, {_name(dtype)}"
    if replay:
        _replayed(low_rank, kwargs, workload, r["fused_fx"], r["unfused"])
    return _line(workload, r), {
        "lowrank_rotary_time_vs_unfused_smollm2_2k": r["fused_fx"]["ms"] / r["unfused"]["ms"],
        "lowrank_rotary_peak_vs_unfused_smollm2_2k": r["fused_fx"]["peak"] / r["unfused"]["peak"]}


def _line(workload: str, r: dict[str, dict[str, Any]]) -> str:
    diff = (r["fused_fx"]["out"] - r["unfused"]["out"]).abs().max().item()
    print(workload, {k: {kk: vv for kk, vv in v.items() if kk != "out" and not isinstance(vv, dict)}
                     for k, v in r.items()}, flush=True)
    for mib in BLOCKS_MIB:
        at = r["fused_fx"][f"blocks {mib} MiB"]
        BLOCK_LINES.append(f"| {workload} | {mib} | {at['peak'] / MiB:.1f} | {at['peak'] / r['unfused']['peak']:.3f} "
                           f"| {at['ms']:.2f} | {at['ms'] / r['unfused']['ms']:.3f} |")
    mib = lambda k, f="peak": f"{r[k][f] / MiB:.1f}"  # noqa: E731
    return (f"| {workload} | {mib('dense')} | {mib('unfused')} | {mib('unfused_fx')} | {mib('fused_fx')} "
            f"| **{r['fused_fx']['peak'] / r['unfused']['peak']:.3f}** | {mib('unfused_fx', 'arena')} "
            f"| {mib('fused_fx', 'arena')} | {r['dense']['ms']:.2f} | {r['unfused']['ms']:.2f} "
            f"| {r['unfused_fx']['ms']:.2f} | {r['fused_fx']['ms']:.2f} "
            f"| **{r['fused_fx']['ms'] / r['unfused']['ms']:.3f}** | {diff:.2e} |")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bert_rows(dtype: torch.dtype, seqs: list[int], replay: bool = False, profile: bool = False
              ) -> tuple[list[str], dict[str, float]]:
    """BERT-base rows at each sequence length, and the goal ratios at 512."""
    dense = _bert_base().to("cuda", dtype)
    low_rank = fxpress.compress.svd(_bert_base(), rank_ratio=RANK_RATIO, targets="encoder.*").model.to("cuda", dtype)
    lines, ratios = [], {}
    for seq in seqs:
        ids = torch.randint(0, 30000, (BATCH, seq), generator=torch.Generator().manual_seed(seq)).cuda()
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        r = {"dense": _run(dense, kwargs, None), "unfused": _run(low_rank, kwargs, None),
             "unfused_fx": _run(low_rank, kwargs, False), "fused_fx": _run(low_rank, kwargs, True)}
        workload = f"BERT-base, {BATCH} x {seq}, {_name(dtype)}"
        lines.append(_line(workload, r))
        if replay:
            _replayed(low_rank, kwargs, workload, r["fused_fx"], r["unfused"])
        if profile and seq == 512:
            torch._dynamo.reset()
            fused = torch.compile(low_rank, backend=fxpress.backend(target="triton", strict=True))
            _profile({f"fused fxpress, {workload}": lambda: fused(**kwargs),
                      f"unfused eager, {workload}": lambda: low_rank(**kwargs)})
        if seq == 512:
            ratios["lowrank_time_vs_unfused_bert_b16_512"] = r["fused_fx"]["ms"] / r["unfused"]["ms"]
            ratios["lowrank_peak_vs_unfused_bert_b16_512"] = r["fused_fx"]["peak"] / r["unfused"]["peak"]
    return lines, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"],
                        help="the goal ratios in the JSON are the first dtype's")
    parser.add_argument("--workloads", nargs="+", default=["bert", "smollm2"], choices=["bert", "smollm2"])
    parser.add_argument("--blocks", type=int, nargs="+", default=BLOCKS_MIB, help="block sizes (MiB) to time")
    parser.add_argument("--replay", action="store_true", help="also time the fused model replayed as CUDA graphs")
    parser.add_argument("--profile", default=None, help="write kernel tables of fused and unfused BERT-base here")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    BLOCKS_MIB[:] = args.blocks
    lines = ["| workload | peak dense eager | peak unfused eager | peak unfused fxpress | peak fused fxpress "
             "| **fused/unfused eager peak** | arena unfused | arena fused | ms dense eager | ms unfused eager "
             "| ms unfused fxpress | ms fused fxpress | **fused/unfused eager time** | max abs fused-unfused |",
             "|" + "---|" * 14]
    ratios: dict[str, float] = {}
    for dtype in [getattr(torch, name) for name in args.dtypes]:
        rows, bert = bert_rows(dtype, args.seqs, args.replay, args.profile is not None and not ratios) \
            if "bert" in args.workloads else ([], {})
        line, rotary = rotary_row(dtype, replay=args.replay) if "smollm2" in args.workloads else (None, {})
        lines += [*rows, *([line] if line else [])]
        for key, value in {**bert, **rotary}.items():
            ratios.setdefault(key, value)
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{datetime.date.today()}. Random weights, {RANK_RATIO:.0%} of each factored Linear's weights. "
            "Memory in MiB, latency in ms; the ratios are fused fxpress over unfused eager (cuBLAS + SDPA).\n\n"
            + "\n".join(lines)
            + f"\n\nThe fused model again with other block sizes (default {library.CUDA_BLOCK_BYTES // MiB} MiB):\n\n"
            + "| workload | block MiB | peak fused | fused/unfused eager peak | ms fused | fused/unfused eager time |\n"
            + "|---|---|---|---|---|---|\n" + "\n".join(BLOCK_LINES)
            + ("\n\nThe fused model replayed as CUDA graphs (`cuda_graphs=True`):\n\n"
               "| workload | ms fused | ms fused, replayed | ms unfused eager | **replayed/unfused eager time** "
               "| max abs replayed-plain |\n|---|---|---|---|---|---|\n"
               + "\n".join(REPLAY_LINES) if REPLAY_LINES else ""))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.profile:
        Path(args.profile).write_text("\n\n".join(PROFILE_PARTS) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                               "date": str(datetime.date.today()), **ratios}, indent=2))


if __name__ == "__main__":
    main()
