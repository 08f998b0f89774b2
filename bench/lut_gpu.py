"""LUT matmul on a CUDA GPU: fxpress's Triton LUT GEMV and dequantise-per-tile GEMM against fp16
``torch.mm`` and against dequantise + ``mm``, next to the memory-bandwidth floor.

Shapes (out x in) 4096 x 4096 and 4096 x 11008, M = 1 and 16 rows, 2/3/4-bit RTN weights in groups
of 128. The floor is the bytes the kernel must read (weights with their scales; fp16 weights for
``mm``) over the device-to-device copy bandwidth measured in the same run. Every path takes fp16
activations and writes fp16. Times are ``triton.testing.do_bench`` medians; the error is the larger
of the two fxpress paths' relative error against the fp32 product of the same fp16 activations with
the dequantised weight.

Run (on a CUDA machine): ``TRITON_INTERPRET=0 python bench/lut_gpu.py [--markdown PATH]``
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
from triton.testing import do_bench

import fxpress  # noqa: F401  (registers the ops)
from fxpress.ops.kernels import lut
from fxpress import lowbit


def _bandwidth() -> float:
    """Bytes per ms of a large device-to-device copy, read plus written."""
    src = torch.randn(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    bandwidth = _bandwidth()
    lines = [f"LUT matmul, {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()} "
             f"(`bench/lut_gpu.py`); copy bandwidth {bandwidth / 1e9:.2f} TB/s (read + write)", "",
             "| out x in | M | bits | fp16 mm ms | dequantise + mm ms | fxpress LUT ms | fxpress tiled GEMM ms | "
             "weight bytes / fp16 | floor ms (LUT bytes) | LUT / floor | LUT / fp16 mm | tiled / fp16 mm | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, k in ((4096, 4096), (4096, 11008)):
        weight = torch.randn(n, k, device="cuda") * 0.02
        w16 = weight.half()
        for m in (1, 16):
            x16 = torch.randn(m, k, device="cuda").half()
            for bits in (4, 3, 2):
                q = lowbit.rtn(weight.cpu(), bits, 128)
                planes, alpha, beta = q.planes.cuda(), q.alpha.cuda(), q.beta.cuda()
                out = torch.empty(m, n, device="cuda", dtype=torch.float16)
                run_lut = lambda: lut.lut_linear(x16, planes, alpha, beta, None, k, 128, m, out)  # noqa: E731
                run_tiled = lambda: lut.lut_linear(x16, planes, alpha, beta, None, k, 128, 0, out)  # noqa: E731
                dequant = lambda: x16 @ torch.ops.fxpress.dequantize_planes(planes, alpha, beta, k, 128).half().T  # noqa: E731
                reference = x16.float() @ torch.ops.fxpress.dequantize_planes(planes, alpha, beta, k, 128).T
                run_lut()
                err = float((out.float() - reference).norm() / reference.norm())
                run_tiled()
                err = max(err, float((out.float() - reference).norm() / reference.norm()))
                t_mm = do_bench(lambda: x16 @ w16.T, return_mode="median")
                t_dq = do_bench(dequant, return_mode="median")
                t_lut = do_bench(run_lut, return_mode="median")
                t_tiled = do_bench(run_tiled, return_mode="median")
                nbytes = q.nbytes()
                floor = nbytes / bandwidth
                lines.append(f"| {n}x{k} | {m} | {bits} | {t_mm:.4f} | {t_dq:.4f} | {t_lut:.4f} | {t_tiled:.4f} | "
                             f"{nbytes / (n * k * 2):.3f} | {floor:.4f} | {t_lut / floor:.1f} | {t_lut / t_mm:.2f} | {t_tiled / t_mm:.2f} | "
                             f"{err:.1e} |")
                print(lines[-1], flush=True)
    from _common import print_table

    print_table(lines, args.markdown)


if __name__ == "__main__":
    main()
