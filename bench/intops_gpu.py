"""Integer-only kernels on a CUDA GPU against the float kernels, on BERT-base shapes.

For softmax (8 x 12 heads x S x S attention scores, S = 128 and 512), GELU (8 x S x 3072) and
LayerNorm (8 x S x 768): the median time (``triton.testing.do_bench``) of

- torch's float kernel in fp16 and in fp32;
- the integer kernel alone (codes in, codes out: what runs between two integer ops);
- the whole integer path from a float input: per-row scale, quantise kernel, integer kernel and
  the dequantising multiply (what a float graph pays for one rewritten op), and for softmax the
  same path as one kernel (``int_softmax_dynamic``, what a compiled softmax with row scales runs);
- the op compiled by fxpress (``target="triton"``) as a float op (its generated Triton kernel)
  and with ``integer=IntegerOnly()`` (the same path as generated code, wrapper included).

Each integer kernel's output on the GPU is also compared with the torch reference on the CPU
(``bit-exact`` column), and its error against the fp32 op is printed.

Then a whole model: a MiniLM-shaped BERT (6 layers, hidden 384, 12 heads, FFN 1536, random
weights, eager attention so its softmax is in the graph), batch 32 x 128: the fp16 forward in
eager, the fp32 forward in eager and through fxpress (``target="triton"``), and the integer-only
forward through fxpress (``target="triton"``, ``integer=IntegerOnly()``: every softmax, GELU and
LayerNorm in integer arithmetic), of the fp32 model (the goal ratio) and of the fp16 one. The
forward is bound by its launches (the GPU idles between them), so each fxpress forward is timed
again replayed as CUDA graphs (``cuda_graphs=True``, as ``mode="reduce-overhead"``), next to the
fp16 model replayed the same way (fxpress without integer rewrites), the baseline with the same
launch cost; the replayed outputs are checked against the plain calls'.

Last, I-BERT's whole integer path: linear layers too on int8 codes (``ops=(..., "linear")``,
``torch._int_mm`` on int8 tensor cores), with the float glue in fp16 and in fp32, plain and replayed.

Run (on a CUDA machine): ``TRITON_INTERPRET=0 python bench/intops_gpu.py [--markdown PATH] [--json PATH]``;
the JSON holds ``int_minilm_time_vs_fp16_b32_128`` (the whole integer path with fp16 glue over
fp16, both forwards replayed: the GPU's own time), the same with fp32 glue
(``..._fp32_glue_...``), the integer nonlinearities alone with float GEMMs (``..._float_gemm_...``),
``int_minilm_replayed_time_vs_fp16_eager_b32_128`` and ``int_minilm_time_vs_fp16_not_replayed_b32_128``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import fxpress  # noqa: F401  (registers the ops)
from fxpress.ops.kernels import integer as kernels
from fxpress.integer import constants

ops = torch.ops.fxpress
CFG = fxpress.IntegerOnly()
# I-BERT's whole integer path: linear layers too, on int8 codes and int8 tensor cores.
FULL = fxpress.IntegerOnly(ops=("softmax", "gelu", "layer_norm", "linear"))


def _inputs(kind: str, seq: int, device: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seq)
    if kind == "softmax":
        x = torch.randn(8, 12, seq, seq, generator=g) * 2.5
        x[..., seq * 3 // 4:] = torch.finfo(torch.float32).min
    elif kind == "gelu":
        x = torch.randn(8, seq, 3072, generator=g) * 1.5 - 0.5
    else:
        x = torch.randn(8, seq, 768, generator=g)
        x[..., [17, 301, 588]] *= 25
    return x.to(device)


def _layer_norm_parts(width: int, device: str):
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.rand(width, generator=g) + 0.5, torch.randn(width, generator=g) * 0.1
    out_shift, bias_codes, scale = constants.layer_norm_affine(weight, bias, width)
    in_shift, var_shift = constants.layer_norm_shifts(width, CFG.layer_norm_input_bits - 1)
    return weight.to(device), bias.to(device), out_shift, bias_codes.to(device), scale.to(device), in_shift, var_shift


class _Module(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _case(kind: str, seq: int, device: str) -> dict:
    x = _inputs(kind, seq, device)
    masked, bits = kind == "softmax", (CFG.layer_norm_input_bits if kind == "layer_norm" else 8)
    if kind == "layer_norm":
        weight, bias, out_shift, bias_codes, ln_scale, in_shift, var_shift = _layer_norm_parts(x.shape[-1], device)
        norm = torch.nn.LayerNorm(x.shape[-1], device=device)
        with torch.no_grad():
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
        float_op = lambda t: F.layer_norm(t, (t.shape[-1],), norm.weight.to(t.dtype), norm.bias.to(t.dtype))  # noqa: E731
    else:
        float_op = (lambda t: torch.softmax(t, -1)) if kind == "softmax" else F.gelu
    scale = ops.int_row_scale(x, masked, bits)
    codes = torch.empty(x.shape, dtype=torch.int8 if bits == 8 else torch.int32, device=device)
    kernels.int_quantize(x, scale, masked, bits, codes)

    if kind == "softmax":
        out = torch.empty(x.shape, dtype=torch.uint8, device=device)
        run = lambda: kernels.int_softmax(codes, scale, CFG.method, CFG.clip("softmax"), CFG.softmax_exp_bits,  # noqa: E731
                                          CFG.softmax_bits, out)
        reference = lambda: ops.int_softmax(codes.cpu(), scale.cpu(), CFG.method, CFG.clip("softmax"),  # noqa: E731
                                            CFG.softmax_exp_bits, CFG.softmax_bits)
        dequantise = lambda: out.float() * 2.0 ** -CFG.softmax_bits  # noqa: E731
    elif kind == "gelu":
        out = torch.empty(x.shape, dtype=torch.int32, device=device)
        run = lambda: kernels.int_gelu(codes, scale, CFG.method, CFG.clip("gelu"), CFG.gelu_exp_bits, out)  # noqa: E731
        reference = lambda: ops.int_gelu(codes.cpu(), scale.cpu(), CFG.method, CFG.clip("gelu"), CFG.gelu_exp_bits)  # noqa: E731
        gelu_scale = torch.empty_like(scale)
        dequantise = lambda: out.float() * kernels.int_gelu_scale(scale, CFG.method, gelu_scale)  # noqa: E731
    else:
        out = torch.empty(x.shape, dtype=torch.int32, device=device)
        run = lambda: kernels.int_layer_norm(codes, bias_codes, in_shift, var_shift, out_shift, out)  # noqa: E731
        reference = lambda: ops.int_layer_norm(codes.cpu(), bias_codes.cpu(), in_shift, var_shift, out_shift)  # noqa: E731
        dequantise = lambda: out.float() * ln_scale  # noqa: E731

    row_scale = torch.empty_like(scale)

    def whole_path():
        kernels.int_row_scale(x, masked, bits, row_scale)
        kernels.int_quantize(x, row_scale, masked, bits, codes)
        run()
        return dequantise()

    run()
    torch.cuda.synchronize()
    exact = torch.equal(out.cpu(), reference())
    quantise_exact = torch.equal(codes.cpu(), ops.int_quantize(x.cpu(), scale.cpu(), masked, bits))
    error = (whole_path() - float_op(x)).abs()
    x16 = x.half()
    module = norm if kind == "layer_norm" else _Module(float_op)  # a LayerNorm's weights must be parameters
    compiled = {}
    for name, integer in (("fxpress float", None), ("fxpress int", CFG)):
        torch._dynamo.reset()
        fn = torch.compile(module, backend=fxpress.backend(target="triton", integer=integer))
        fxpress.counters.clear()
        with torch.no_grad():
            fn(x)
            compiled[name] = do_bench(lambda: fn(x), return_mode="median")
        if integer is not None and not fxpress.counters["integer_only"].get(f"{kind} => int_{kind}"):
            raise RuntimeError(f"the compiled {kind} was not rewritten: {dict(fxpress.counters['integer_only'])}")
    times = {"fp16": do_bench(lambda: float_op(x16), return_mode="median"),
             "fp32": do_bench(lambda: float_op(x), return_mode="median"),
             "int kernel": do_bench(run, return_mode="median"),
             "int path": do_bench(whole_path, return_mode="median"), **compiled}
    if kind == "softmax":  # the same path as one kernel (what a compiled softmax with row scales runs)
        args = (CFG.method, CFG.clip("softmax"), CFG.softmax_exp_bits, CFG.softmax_bits)
        kernels.int_softmax_dynamic(x, *args, out)
        exact = exact and torch.equal(out.cpu(), ops.int_softmax_dynamic(x.cpu(), *args))
        times["fused path"] = do_bench(lambda: kernels.int_softmax_dynamic(x, *args, out).float()
                                       * 2.0 ** -CFG.softmax_bits, return_mode="median")
    return {"op": kind, "shape": "x".join(map(str, x.shape)), "bit_exact": exact and quantise_exact,
            "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean()), **times}


def _profile(calls: dict[str, Callable[[], object]], path: Path) -> None:
    """Where each call's time goes: torch's profiler over 5 calls, kernels by total GPU time, and the
    number of kernel launches and CPU ms per call (a launch-bound forward shows it here)."""
    from torch.profiler import ProfilerActivity, profile

    parts = []
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels_run = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        cpu_ms = sum(e.self_cpu_time_total for e in events) / 5e3
        parts.append(f"## {name}: {kernels_run / 5:.0f} GPU kernels and {cpu_ms:.2f} ms of CPU per call\n\n"
                     + events.table(sort_by="device_time_total", row_limit=20))
    path.write_text("\n\n".join(parts) + "\n")


def minilm_forward(batch: int = 32, seq: int = 128, profile: Path | None = None) -> dict[str, float]:
    """Median ms of the MiniLM-shaped forward in fp16 and fp32 eager and integer-only through fxpress."""
    import copy

    from transformers import BertConfig, BertModel

    # Nine compiled copies of one forward: past Dynamo's default limit of 8 entries per code object
    # the later ones would silently run eagerly.
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536)
    model = BertModel._from_config(config, attn_implementation="eager").eval().cuda()
    half = copy.deepcopy(model).half()
    ids = torch.randint(0, 30522, (batch, seq), generator=torch.Generator().manual_seed(seq)).cuda()
    torch._dynamo.reset()
    fxpress.counters.clear()
    integer = torch.compile(model, backend=fxpress.backend(target="triton", integer=CFG))
    integer(input_ids=ids)
    rewritten = {k: v for k, v in fxpress.counters["integer_only"].items() if "not applied" not in k}
    if not rewritten:
        raise RuntimeError(f"nothing was rewritten to integer-only: {dict(fxpress.counters['integer_only'])}")
    torch._dynamo.reset()
    floating = torch.compile(copy.deepcopy(model), backend=fxpress.backend(target="triton"))
    floating(input_ids=ids)
    torch._dynamo.reset()  # the same rewrite on the fp16 model: its matmuls on tensor cores
    integer_half = torch.compile(copy.deepcopy(half), backend=fxpress.backend(target="triton", integer=CFG))
    integer_half(input_ids=ids)
    torch._dynamo.reset()
    full = torch.compile(copy.deepcopy(half), backend=fxpress.backend(target="triton", integer=FULL))
    full(input_ids=ids)
    if not fxpress.counters["integer_only"].get("linear => int_matmul"):
        raise RuntimeError(f"no linear layer was rewritten: {dict(fxpress.counters['integer_only'])}")
    replayed = {}  # each compiled twice: seen, then captured
    for name, base, integer_cfg in (("fp16 replayed", half, None), ("int replayed", model, CFG),
                                    ("int fp16 replayed", half, CFG), ("full replayed", model, FULL),
                                    ("full fp16 replayed", half, FULL)):
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(base), backend=fxpress.backend(
            target="triton", integer=integer_cfg, cuda_graphs=True))
        compiled(input_ids=ids)
        compiled(input_ids=ids)
        replayed[name] = compiled
    if fxpress.counters["cuda_graphs"]["captured"] < 5:
        raise RuntimeError(f"a forward was not captured: {dict(fxpress.counters['cuda_graphs'])}")
    fp32_output = model(input_ids=ids).last_hidden_state
    cosine = {name: torch.nn.functional.cosine_similarity(
        f(input_ids=ids).last_hidden_state.float().flatten(), fp32_output.flatten(), dim=0).item()
        for name, f in (("fp16", half), ("int", integer), ("full fp16", full))}
    replay_diff = (replayed["int replayed"](input_ids=ids).last_hidden_state
                   - integer(input_ids=ids).last_hidden_state).abs().max().item()
    if profile is not None:
        _profile({"fp16 eager": lambda: half(input_ids=ids), "fp32 fxpress": lambda: floating(input_ids=ids),
                  "integer-only fxpress": lambda: integer(input_ids=ids),
                  "integer-only with int8 GEMMs, fp16 glue, replayed":
                      lambda: replayed["full fp16 replayed"](input_ids=ids)}, profile)
    return {"fp16": do_bench(lambda: half(input_ids=ids), return_mode="median"),
            "fp32": do_bench(lambda: model(input_ids=ids), return_mode="median"),
            "fp32 fxpress": do_bench(lambda: floating(input_ids=ids), return_mode="median"),
            "int": do_bench(lambda: integer(input_ids=ids), return_mode="median"),
            "int fp16": do_bench(lambda: integer_half(input_ids=ids), return_mode="median"), "rewritten": rewritten,
            "full fp16": do_bench(lambda: full(input_ids=ids), return_mode="median"), "cosine": cosine,
            **{name: do_bench(lambda f=f: f(input_ids=ids), return_mode="median") for name, f in replayed.items()},
            "replay diff": replay_diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, help="write torch profiler tables of the MiniLM forwards here")
    args = parser.parse_args()
    device = "cuda"
    torch.set_grad_enabled(False)
    rows = [_case(kind, seq, device) for seq in args.seqs for kind in ("softmax", "gelu", "layer_norm")]
    name = torch.cuda.get_device_name()
    lines = [f"Integer-only kernels vs float, {name}, torch {torch.__version__}, {datetime.date.today()} "
             f"(`bench/intops_gpu.py`; I-BERT method, per-row scales, LayerNorm input {CFG.layer_norm_input_bits} bits)",
             "",
             "| op | shape | bit-exact vs CPU reference | max abs err | mean abs err | torch fp16 ms | torch fp32 ms | "
             "int kernel ms | int / fp16 | whole int path ms | path / fp16 | the path as one kernel ms | "
             "fxpress float (fp32) ms | fxpress int ms | int / float, fxpress |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fused = f"{r['fused path']:.4f}" if "fused path" in r else "-"
        lines.append(f"| {r['op']} | {r['shape']} | {'yes' if r['bit_exact'] else 'NO'} | {r['max_abs_error']:.4f} | "
                     f"{r['mean_abs_error']:.5f} | {r['fp16']:.4f} | {r['fp32']:.4f} | {r['int kernel']:.4f} | "
                     f"{r['int kernel'] / r['fp16']:.2f} | {r['int path']:.4f} | {r['int path'] / r['fp16']:.2f} | "
                     f"{fused} | {r['fxpress float']:.4f} | {r['fxpress int']:.4f} | "
                     f"{r['fxpress int'] / r['fxpress float']:.2f} |")
    forward = minilm_forward(profile=args.profile)
    lines += ["", f"MiniLM-shaped BERT, 32 x 128, random weights, sites rewritten: {forward['rewritten']}", "",
              "| fp16 eager ms | fp32 eager ms | fp32 fxpress ms | fxpress integer-only ms | **integer-only / fp16** "
              "| fxpress integer-only, fp16 matmuls ms | that / fp16 |",
              "|---|---|---|---|---|---|---|",
              f"| {forward['fp16']:.3f} | {forward['fp32']:.3f} | {forward['fp32 fxpress']:.3f} | {forward['int']:.3f} "
              f"| **{forward['int'] / forward['fp16']:.2f}** | {forward['int fp16']:.3f} "
              f"| {forward['int fp16'] / forward['fp16']:.2f} |",
              "", "The same forwards replayed as CUDA graphs (`cuda_graphs=True`); max abs difference of the "
              f"replayed integer-only output from the plain call's: {forward['replay diff']:.2e}", "",
              "| fp16 eager ms | fp16 fxpress replayed ms | integer-only replayed ms | integer-only, fp16 matmuls, "
              "replayed ms | **integer-only replayed / fp16 eager** | **integer-only replayed / fp16 replayed** |",
              "|---|---|---|---|---|---|",
              f"| {forward['fp16']:.3f} | {forward['fp16 replayed']:.3f} | {forward['int replayed']:.3f} "
              f"| {forward['int fp16 replayed']:.3f} | **{forward['int replayed'] / forward['fp16']:.2f}** "
              f"| **{forward['int replayed'] / forward['fp16 replayed']:.2f}** |",
              "", "Integer-only with I-BERT's integer GEMMs too (`IntegerOnly(ops=(..., \"linear\"))`: every linear "
              "layer on int8 codes through `torch._int_mm`), the glue (attention's two matmuls, residual adds, "
              "dequantising multiplies) in the model's dtype. Cosine of the last hidden state to fp32 eager: "
              + ", ".join(f"{k} {v:.5f}" for k, v in forward["cosine"].items()), "",
              "| fp16 eager ms | int8-GEMM integer-only, fp16 glue ms | fp16 replayed ms | int8-GEMM, fp32 glue, "
              "replayed ms | int8-GEMM, fp16 glue, replayed ms | **that / fp16 replayed** |",
              "|---|---|---|---|---|---|",
              f"| {forward['fp16']:.3f} | {forward['full fp16']:.3f} | {forward['fp16 replayed']:.3f} "
              f"| {forward['full replayed']:.3f} | {forward['full fp16 replayed']:.3f} "
              f"| **{forward['full fp16 replayed'] / forward['fp16 replayed']:.2f}** |"]
    from _common import print_table

    print_table(lines, args.markdown)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "date": str(datetime.date.today()),
                                         # like for like: both forwards replayed (the GPU's own time),
                                         # I-BERT's whole integer path (int8 GEMMs, fp16 glue)
                                         "int_minilm_time_vs_fp16_b32_128":
                                             forward["full fp16 replayed"] / forward["fp16 replayed"],
                                         "int_minilm_fp32_glue_time_vs_fp16_b32_128":
                                             forward["full replayed"] / forward["fp16 replayed"],
                                         "int_minilm_float_gemm_time_vs_fp16_b32_128":
                                             forward["int replayed"] / forward["fp16 replayed"],
                                         "int_minilm_replayed_time_vs_fp16_eager_b32_128":
                                             forward["int replayed"] / forward["fp16"],
                                         "int_minilm_time_vs_fp16_not_replayed_b32_128":
                                             forward["int"] / forward["fp16"]},
                                        indent=2))


if __name__ == "__main__":
    main()
