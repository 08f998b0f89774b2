"""The low-rank ops alone on a CUDA GPU at BERT-base shapes (rank ratio 0.5: FFN rank 307,
attention rank 192), each strategy against the unfused chain a user would otherwise run:

- ``unfused``: two cuBLAS GEMMs per factored Linear, the activation, SDPA (attention);
- ``triton kernel``: the single Triton kernel of ``fxpress/ops/kernels/lowrank.py`` (rank-r
  intermediates on chip), forced at every size;
- ``library N MiB``: the library order (``fxpress/ops/kernels/lowrank_library.py``, what a CUDA
  launch runs by default) with blocks of N MiB (``CUDA_BLOCK_BYTES``).

Median ms (``triton.testing.do_bench``), the peak memory one call adds, and for the FFN the share
of the roofline: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) over the time, with the bytes a
fused FFN must move (x, out and the factors) and the peaks of an H200 (fp32 on CUDA cores 67
TFLOP/s, fp16 tensor cores 989 TFLOP/s dense, 4.8 TB/s).

Run: ``python bench/lowrank_ops_gpu.py [--markdown PATH]``
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from fxpress.ops.kernels import lowrank as kernels
from fxpress.ops.kernels import lowrank_library as library

MiB = 1 << 20
HIDDEN, FFN, HEADS = 768, 3072, 12
RANK_FFN = int(0.5 * HIDDEN * FFN / (HIDDEN + FFN))  # as compress.svd(rank_ratio=0.5) cuts
RANK_ATTENTION = int(0.5 * HIDDEN * HIDDEN / (2 * HIDDEN))
PEAK_FLOPS = {torch.float32: 67e12, torch.float16: 989e12}
PEAK_BYTES = 4.8e12
BLOCKS_MIB = (4, 8, 16, 32)


def _factor(out_features: int, in_features: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=g, device="cuda") / in_features ** 0.5).to(dtype)


def _measure(fn: Callable[[], Any]) -> tuple[float, int]:
    """(median ms, bytes one call allocates beyond what was live before it)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return do_bench(fn, warmup=10, rep=60, return_mode="median"), peak


def _strategies(launch: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
    """``launch`` (an op's launcher) forced onto its Triton kernel, and onto the library order at
    each block size."""
    def forced(max_rows: int, block_mib: int) -> Callable[[], Any]:
        def call():
            kernels.FUSED_MAX_ROWS, library.CUDA_BLOCK_BYTES = max_rows, block_mib * MiB
            return launch()
        return call

    return {"triton kernel": forced(1 << 62, 32), **{f"library {b} MiB": forced(0, b) for b in BLOCKS_MIB}}


def ffn_rows(dtype: torch.dtype, rows: int) -> list[str]:
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=dtype)
    down1, up1 = _factor(RANK_FFN, HIDDEN, dtype, 1), _factor(FFN, RANK_FFN, dtype, 2)
    down2, up2 = _factor(RANK_FFN, FFN, dtype, 3), _factor(HIDDEN, RANK_FFN, dtype, 4)
    b1, b2 = torch.zeros(FFN, device="cuda", dtype=dtype), torch.zeros(HIDDEN, device="cuda", dtype=dtype)
    out = torch.empty_like(x)
    args = (x, down1, up1, b1, down2, up2, b2, "gelu", None, None, None, out)
    unfused = lambda: F.linear(F.linear(F.gelu(F.linear(F.linear(x, down1), up1, b1)), down2), up2, b2)  # noqa: E731
    def launch():
        kernels.lowrank_ffn(*args)
        return out

    runs = {"unfused": unfused, **_strategies(launch)}
    expected = unfused()
    flops = 2 * rows * 2 * (HIDDEN * RANK_FFN + RANK_FFN * FFN)
    moved = (2 * x.numel() + sum(t.numel() for t in (down1, up1, b1, down2, up2, b2))) * x.element_size()
    roofline_ms = 1e3 * max(flops / PEAK_FLOPS[dtype], moved / PEAK_BYTES)
    measured = {name: _measure(fn) for name, fn in runs.items()}
    lines = []
    for name, (ms, peak) in measured.items():
        error = (runs[name]() - expected).abs().max().item()
        lines.append(f"| FFN {rows} x {HIDDEN} | {str(dtype)[6:]} | {name} | {ms:.4f} | "
                     f"**{ms / measured['unfused'][0]:.2f}** | {peak / MiB:.1f} | {roofline_ms / ms:.0%} "
                     f"| {error:.1e} |")
    return lines


def attention_rows(dtype: torch.dtype, batch: int = 16, seq: int = 512) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = [torch.randn(batch, seq, RANK_ATTENTION, device="cuda", generator=g).to(dtype) for _ in range(3)]
    ups = [_factor(HIDDEN, RANK_ATTENTION, dtype, 10 + i) for i in range(3)]
    biases = [torch.zeros(HIDDEN, device="cuda", dtype=dtype) for _ in range(3)]
    o_down = _factor(RANK_ATTENTION, HIDDEN, dtype, 20)
    out = torch.empty(batch, seq, RANK_ATTENTION, device="cuda", dtype=dtype)
    args = [t for triple in zip(ps, ups, biases) for t in triple]
    args += [HEADS, HEADS, None, False, None, o_down, None, None, False, None, None, 1e-6, out]

    def unfused():
        q, k, v = [F.linear(p, u, b).view(batch, seq, HEADS, -1).transpose(1, 2) for p, u, b in zip(ps, ups, biases)]
        context = F.scaled_dot_product_attention(q, k, v)
        return context.transpose(1, 2).reshape(batch, seq, HIDDEN) @ o_down.T

    def launch():
        kernels.lowrank_attention(*args)
        return out

    runs = {"unfused": unfused, **_strategies(launch)}
    expected = unfused()
    measured = {name: _measure(fn) for name, fn in runs.items()}
    lines = []
    for name, (ms, peak) in measured.items():
        error = (runs[name]() - expected).abs().max().item()
        lines.append(f"| attention {batch} x {seq}, {HEADS} heads | {str(dtype)[6:]} | {name} | {ms:.4f} | "
                     f"**{ms / measured['unfused'][0]:.2f}** | {peak / MiB:.1f} | | {error:.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 128, 1024, 8192])
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    defaults = kernels.FUSED_MAX_ROWS, library.CUDA_BLOCK_BYTES
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"{datetime.date.today()}; defaults FUSED_MAX_ROWS={defaults[0]}, "
             f"CUDA_BLOCK_BYTES={defaults[1] // MiB} MiB",
             "", "| op | dtype | strategy | ms | **/ unfused** | peak MiB | roofline | max abs err vs unfused |",
             "|---|---|---|---|---|---|---|---|"]
    try:
        for dtype in (torch.float32, torch.float16):
            for rows in args.rows:
                lines += ffn_rows(dtype, rows)
                print(lines[-1], flush=True)
            lines += attention_rows(dtype)
            print(lines[-1], flush=True)
    finally:
        kernels.FUSED_MAX_ROWS, library.CUDA_BLOCK_BYTES = defaults
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
