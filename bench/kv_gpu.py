"""Decode attention on a GPU: fxpress's KIVI kernel over packed K/V vs torch SDPA over an fp16 cache.

One attention layer, one new token per sequence, contexts 8k-32k, batch 1 and 8, two layer shapes:
SmolLM2-135M (9 query heads on 3 KV heads, head_dim 64) and Llama-3-8B (32 on 8, head_dim 128).
The KIVI cache is filled through the Triton quantise kernels; the time is the kernel plus the
combine of its split-K partials (``do_bench`` median). Also printed: the cache bytes each reads
and the largest difference from attention over the dequantised cache in fp32.

Run (on a CUDA machine): ``TRITON_INTERPRET=0 python bench/kv_gpu.py [--markdown PATH]``
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fxpress.kv.kernels import kivi
from fxpress.kv import KIVI
from fxpress.kv.kivi import KIVIStore

SHAPES = {"SmolLM2 (9/3 x 64)": (9, 3, 64), "Llama-3-8B (32/8 x 128)": (32, 8, 128)}


def _store(policy: KIVI, batch: int, kv_heads: int, d: int, context: int, k: torch.Tensor, v: torch.Tensor) -> KIVIStore:
    store = KIVIStore(policy, context + 1, batch=batch, heads=kv_heads, head_dim=d, dtype=torch.float16,
                      device=k.device)
    store.append(k, v, 0)
    return store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    lines = [f"# Decode attention, KIVI vs fp16 SDPA — {torch.cuda.get_device_name()}, "
             f"{datetime.date.today()}, torch {torch.__version__}", "",
             "| layer | batch | context | fp16 cache MiB | SDPA fp16 ms | KIVI-4 MiB | KIVI-4 ms | KIVI-2 MiB | "
             "KIVI-2 ms | KIVI-2 / SDPA time | max err KIVI-2 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (hq, hkv, d) in SHAPES.items():
        for batch in args.batches:
            for context in args.contexts:
                g = torch.Generator(device=device).manual_seed(0)
                k = torch.randn(batch, hkv, context, d, device=device, generator=g, dtype=torch.float16)
                v = torch.randn(batch, hkv, context, d, device=device, generator=g, dtype=torch.float16)
                q = torch.randn(batch, hq, 1, d, device=device, generator=g, dtype=torch.float16)
                kn, vn = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
                sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                row = [name, str(batch), str(context), f"{2 * k.nbytes / 2**20:.1f}", f"{sdpa_ms:.3f}"]
                for bits in (4, 2):
                    store = _store(KIVI(bits=bits), batch, hkv, d, context - 1, k[:, :, :-1], v[:, :, :-1])
                    ms = do_bench(lambda: kivi.decode_attention(q, store, kn, vn, d ** -0.5))
                    row += [f"{store.nbytes() / 2**20:.1f}", f"{ms:.3f}"]
                    if bits == 2:
                        ks, vs = zip(*store.segments())
                        kd, vd = torch.cat([*ks, kn.float()], 2), torch.cat([*vs, vn.float()], 2)
                        exact = F.scaled_dot_product_attention(q.float(), kd, vd, enable_gqa=True)
                        err = (kivi.decode_attention(q, store, kn, vn, d ** -0.5) - exact).abs().max().item()
                        row += [f"{ms / sdpa_ms:.2f}", f"{err:.1e}"]
                    del store
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
                del k, v
                torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
