"""The cpp target's kernels against the baselines a CPU user would otherwise pick, side by side in
one run on this machine.

Sections (markdown tables; ``--json`` writes the rows):

- ``lut``: ``fxpress::lut_linear`` (4-bit RTN, group 128) on the cpp target at M = 1, 4 and 16 rows,
  against fp32 ``F.linear`` and torch's own int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``,
  bf16 activations, same group size), with the bytes each reads and the share it reaches of this
  machine's read bandwidth over a buffer of the same size (a weight called over and over stays in
  the last-level cache where it fits); plus its error against the exact product of the same
  low-bit weights (``x @ dequantize(W).T``).
- ``integer``: the integer-only softmax, GELU and LayerNorm kernels at MiniLM's sizes (batch 8 x 128
  tokens, 12 heads, hidden 384, MLP 1536), under both methods (I-BERT, the default, and I-ViT's
  shifts), against float ATen on the same tensors (the two taken in turns), and the cpu target's
  reference of each; the cpp results are checked equal to the reference first.
- ``lowrank``: the low-rank kernels at BERT-base shapes (hidden 768, 12 heads, FFN 3072, every
  factor pair keeping 50 % of its Linear's parameters: rank 307 for the FFN, 192 for Q, K, V and
  the output), batch 16 x 128 and 4 x 512 tokens: the fused FFN (the cpp kernel, and the cpu
  target's streamed reference) against the unfused chain (four ``F.linear`` and GELU), and fused
  attention with its output factor against the unfused Q, K, V up-projections + SDPA + output
  factor; with GFLOP/s of the cpp kernels (all three taken in turns, round after round).
- ``dense``: the dense model's own pointwise and row kernels at MiniLM's sizes (GELU, residual add +
  LayerNorm, scaled and masked softmax, SDPA over a padding mask) through ``torch.compile``:
  fxpress (on this machine the cpp target, which generates them in C++ and runs SDPA with its
  attention kernel), fxpress's cpu target (torch calls) and Inductor, against
  eager, taken in turns round after round; with the bytes a call must move and the share of the
  measured read bandwidth the generated kernel reaches.
- ``overhead``: what one call of a compiled graph costs beyond its ops, on a graph of three tiny ops
  (Linear 16 -> ReLU -> Linear 16, 2 rows): eager, fxpress and Inductor through ``torch.compile``,
  and fxpress's generated wrapper module called directly against the same ATen calls made
  directly; then MiniLM (batch 8 x 128) through each and through fxpress's cpu target, the
  end-to-end latency (taken in turns, round after round), on a mostly padded batch (one short
  sentence 8 times) and on 8 rows of 128 real tokens.

Run: ``python bench/cpu_kernels.py [lut] [integer] [lowrank] [dense] [overhead] [--json PATH]``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fxpress
import fxpress.lowbit as lowbit
from _common import cpu_model, interleaved_medians, median_seconds, print_table, read_bandwidth, run_sections
from fxpress.integer import constants
import fxpress.ops.lowrank as ops_lowrank
from fxpress.ops.cpp import integer as cpp_integer
from fxpress.ops.cpp import lowrank as cpp_lowrank
from fxpress.ops.cpp import lut as cpp_lut

REPEATS = 30
GROUP = 128
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): Llama-7B attention, MLP up, MLP down


def _int4pack(n: int, k: int):
    """torch's int4 CPU kernel on a weight of the same shape and group size."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_zeros = torch.randn(k // GROUP, n, 2).to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)


def lut() -> list[dict]:
    # The roofline is the read bandwidth over a buffer of the bytes the kernel moves: a weight called
    # over and over stays in a large last-level cache, which reads faster than DRAM.
    dram = read_bandwidth()
    rows = []
    lines = [f"CPU: {cpu_model()}; read bandwidth from DRAM (512 MB) {dram / 1e9:.1f} GB/s", "",
             "| out x in | M | fp32 linear ms | torch int4 ms | fxpress cpp ms | vs fp32 | vs int4 | cpp bytes MB "
             "| read GB/s at that size | cpp % of it | rel. error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k)
        q = lowbit.rtn(w, 4, GROUP)
        exact_w = lowbit.dequantize(q.planes, q.alpha, q.beta, k, GROUP)
        int4 = _int4pack(n, k)
        weight_bytes = q.nbytes()
        bandwidth = read_bandwidth(max(1, weight_bytes // 2**20))
        for m in (1, 4, 16):
            x = torch.randn(m, k)
            x_bf16 = x.to(torch.bfloat16)
            out = torch.empty(m, n)
            t_fp32 = median_seconds(lambda: F.linear(x, w), REPEATS)
            t_int4 = median_seconds(lambda: int4(x_bf16), REPEATS)
            t_cpp = median_seconds(lambda: cpp_lut.lut_linear(x, q.planes, q.alpha, q.beta, None, k, GROUP, 16, out),
                                   REPEATS)
            exact = x @ exact_w.T
            error = float((out - exact).norm() / exact.norm())
            moved = weight_bytes + (m * k + m * n) * 4
            row = {"out": n, "in": k, "m": m, "fp32_ms": t_fp32 * 1e3, "int4_ms": t_int4 * 1e3,
                   "cpp_ms": t_cpp * 1e3, "speedup_vs_fp32": t_fp32 / t_cpp, "speedup_vs_int4": t_int4 / t_cpp,
                   "cpp_bytes": moved, "read_bandwidth": bandwidth, "cpp_read_bw_share": moved / t_cpp / bandwidth,
                   "relative_error": error}
            rows.append(row)
            lines.append(f"| {n} x {k} | {m} | {row['fp32_ms']:.2f} | {row['int4_ms']:.2f} | {row['cpp_ms']:.2f} | "
                         f"{row['speedup_vs_fp32']:.2f}x | {row['speedup_vs_int4']:.2f}x | {moved / 1e6:.1f} | "
                         f"{bandwidth / 1e9:.0f} | {100 * row['cpp_read_bw_share']:.0f}% | {error:.1e} |")
    print_table(lines, None)
    return rows


def _integer_cases(method: str):
    """(name, float op, codes, reference op, cpp launcher, extra args, out dtype) at MiniLM's sizes,
    for one integer method (I-BERT's polynomials or I-ViT's shifts; one LayerNorm for both)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 12, 128, 128, generator=g) * 3
    hidden = torch.randn(8, 128, 1536, generator=g)
    normed = torch.randn(8, 128, 384, generator=g) * 2
    ops = torch.ops.fxpress
    cfg = fxpress.IntegerOnly(method=method)
    s_scale = ops.int_row_scale(scores, False, 8)
    g_scale = ops.int_row_scale(hidden, False, 8)
    width = normed.shape[-1]
    in_shift, var_shift = constants.layer_norm_shifts(width, 7)
    out_shift, bias_codes, _ = constants.layer_norm_affine(torch.rand(width, generator=g) + 0.5,
                                                           torch.randn(width, generator=g), width)
    n_scale = ops.int_row_scale(normed, False, 8)
    weight, bias = torch.ones(width), torch.zeros(width)
    softmax_args = (s_scale, method, cfg.clip("softmax"), cfg.softmax_exp_bits, cfg.softmax_bits)
    gelu_args = (g_scale, method, cfg.clip("gelu"), cfg.gelu_exp_bits)
    cases = [
        ("softmax", lambda: torch.softmax(scores, -1), ops.int_quantize(scores, s_scale, False, 8),
         lambda q: ops.int_softmax(q, *softmax_args), cpp_integer.int_softmax, softmax_args, torch.uint8),
        ("gelu", lambda: F.gelu(hidden), ops.int_quantize(hidden, g_scale, False, 8),
         lambda q: ops.int_gelu(q, *gelu_args), cpp_integer.int_gelu, gelu_args, torch.int32),
        ("layer_norm", lambda: F.layer_norm(normed, (width,), weight, bias), ops.int_quantize(normed, n_scale, False, 8),
         lambda q: ops.int_layer_norm(q, bias_codes, in_shift, var_shift, out_shift), cpp_integer.int_layer_norm,
         (bias_codes, in_shift, var_shift, out_shift), torch.int32),
    ]
    return cases if method == "ibert" else cases[:2]


def integer() -> list[dict]:
    rows = []
    lines = [f"CPU: {cpu_model()}", "", "| op | method | shape | float ATen ms | cpu target (reference) ms | cpp ms "
             "| cpp / float | bit-exact |", "|---|---|---|---|---|---|---|---|"]
    for method in ("ibert", "shift"):
        for name, float_op, codes, reference_op, launcher, args, dtype in _integer_cases(method):
            out = torch.empty(codes.shape, dtype=dtype)
            launcher(codes, *args, out)
            exact = torch.equal(out, reference_op(codes))
            t_ref = median_seconds(lambda: reference_op(codes), 5)
            # float and cpp in turns, so a slow spell of the machine falls on both alike
            t = interleaved_medians({"float": float_op, "cpp": lambda: launcher(codes, *args, out)}, REPEATS // 3)
            t_float, t_cpp = t["float"], t["cpp"]
            row = {"op": name, "method": method if name != "layer_norm" else "i-layernorm", "shape": list(codes.shape),
                   "float_ms": t_float * 1e3, "reference_ms": t_ref * 1e3, "cpp_ms": t_cpp * 1e3,
                   "cpp_over_float": t_cpp / t_float, "bit_exact": exact}
            rows.append(row)
            lines.append(f"| {name} | {row['method']} | {tuple(codes.shape)} | {row['float_ms']:.3f} | "
                         f"{row['reference_ms']:.2f} | {row['cpp_ms']:.3f} | {row['cpp_over_float']:.2f}x | "
                         f"{'yes' if exact else 'NO'} |")
    print_table(lines, None)
    return rows


def _factors(n_in: int, rank: int, n_out: int, g: torch.Generator):
    return (torch.randn(rank, n_in, generator=g) / n_in ** 0.5, torch.randn(n_out, rank, generator=g) / rank ** 0.5,
            torch.randn(n_out, generator=g))


def _lowrank_ffn_case(g, rows):
    x = torch.randn(rows, 768, generator=g)
    first, second = _factors(768, 307, 3072, g), _factors(3072, 307, 768, g)
    out = torch.empty(rows, 768)
    unfused = lambda: F.linear(F.linear(F.gelu(F.linear(F.linear(x, first[0]), first[1], first[2])), second[0]),
                               second[1], second[2])
    reference = lambda: ops_lowrank._ffn_into(x, *first, *second, "gelu", None, None, None, out=out)
    fused = lambda: cpp_lowrank.lowrank_ffn(x, *first, *second, "gelu", None, None, None, out)
    flops = 2 * rows * 307 * (768 + 3072) * 2
    return unfused, reference, fused, out, flops


def _lowrank_attention_case(g, batch, seq):
    heads, d, rank = 12, 64, 192
    ps = [torch.randn(batch, seq, rank, generator=g) for _ in range(3)]
    ups = [_factors(rank, rank, 768, g)[1:] for _ in range(3)]  # (up [768, rank], bias)
    o_down = torch.randn(rank, 768, generator=g) / 768 ** 0.5
    keep = torch.ones(batch, 1, 1, seq, dtype=torch.bool)  # BERT's padding mask, nothing padded
    # (num_heads, num_kv_heads, mask, causal, scale, o_down, cos, sin, interleaved, q_norm, k_norm, eps): no rotary
    args = [t for p, (up, bias) in zip(ps, ups) for t in (p, up, bias)] + [heads, heads, keep, False, None, o_down,
                                                                           None, None, False, None, None, 1e-6]
    out = torch.empty(batch, seq, rank)

    def unfused():
        q, k, v = [(p @ up.T + bias).view(batch, seq, heads, d).transpose(1, 2) for p, (up, bias) in zip(ps, ups)]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(batch, seq, 768) \
            @ o_down.T
    reference = lambda: ops_lowrank._attention_into(*args, out=out)
    fused = lambda: cpp_lowrank.lowrank_attention(*args, out)
    flops = 2 * batch * seq * (3 * rank * 768 + 2 * seq * 768 + 768 * rank)
    return unfused, reference, fused, out, flops


def lowrank() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    cases = [("FFN", (16, 128), _lowrank_ffn_case(g, 16 * 128)), ("FFN", (4, 512), _lowrank_ffn_case(g, 4 * 512)),
             ("attention + o_down", (16, 128), _lowrank_attention_case(g, 16, 128)),
             ("attention + o_down", (4, 512), _lowrank_attention_case(g, 4, 512))]
    rows = []
    lines = [f"CPU: {cpu_model()}", "", "| kernel | batch x seq | unfused ms | cpu target (reference) ms | cpp ms "
             "| **cpp / unfused** | cpp GFLOP/s | max abs cpp - unfused |", "|---|---|---|---|---|---|---|---|"]
    for name, (batch, seq), (unfused, reference, fused, out, flops) in cases:
        fused()
        error = float((out - unfused()).abs().max())
        # in turns: MKL's unfused chain moved by 30 % between runs minutes apart on the same machine
        times = interleaved_medians({"unfused": unfused, "reference": reference, "fused": fused}, rounds=4, burst=2)
        t_unfused, t_ref, t_fused = times["unfused"], times["reference"], times["fused"]
        row = {"kernel": name, "batch": batch, "seq": seq, "unfused_ms": t_unfused * 1e3, "reference_ms": t_ref * 1e3,
               "cpp_ms": t_fused * 1e3, "cpp_over_unfused": t_fused / t_unfused, "cpp_gflops": flops / t_fused / 1e9,
               "max_abs_error": error}
        rows.append(row)
        lines.append(f"| {name} | {batch} x {seq} | {row['unfused_ms']:.1f} | {row['reference_ms']:.1f} | "
                     f"{row['cpp_ms']:.1f} | **{row['cpp_over_unfused']:.2f}x** | {row['cpp_gflops']:.0f} | "
                     f"{error:.1e} |")
    print_table(lines, None)
    return rows


# The ways a user can run a dense model on this machine, besides eager.
COMPILERS = {"fxpress": fxpress.backend(), "fxpress target=cpu": fxpress.backend(target="cpu"),
             "inductor": "inductor"}


def _compiled(fn, kwargs: dict | None = None, args: tuple = ()) -> dict:
    """``fn`` compiled by each of ``COMPILERS`` (Dynamo keeps one compiled graph per backend)."""
    made = {}
    for name, backend in COMPILERS.items():
        compiled = torch.compile(fn, backend=backend)
        compiled(*args, **(kwargs or {}))
        made[name] = (lambda c: lambda: c(*args, **(kwargs or {})))(compiled)
    return made


def _mask(batch: int, tokens: int) -> torch.Tensor:
    ids = torch.ones(batch, tokens, dtype=torch.int64)
    ids[::2, tokens // 2:] = 0  # half the sequences padded
    return ids


def _dense_cases():
    """(name, function, inputs, bytes one call must move) at MiniLM's sizes."""
    torch.manual_seed(0)
    hidden, mlp, heads, tokens, batch = 384, 1536, 12, 128, 8
    norm = torch.nn.LayerNorm(hidden).eval()
    f32 = 4
    return [
        ("GELU", F.gelu, (torch.randn(batch, tokens, mlp),), 2 * batch * tokens * mlp * f32),
        ("residual add + LayerNorm", lambda h, r: norm(h + r),
         (torch.randn(batch, tokens, hidden), torch.randn(batch, tokens, hidden)), 3 * batch * tokens * hidden * f32),
        ("scaled, masked softmax", lambda s, m: torch.softmax(s * 0.125 + (1.0 - m[:, None, None, :].float()) * -1e4, -1),
         (torch.randn(batch, heads, tokens, tokens), _mask(batch, tokens)), 2 * batch * heads * tokens * tokens * f32),
        # q, k, v as the projections leave them ([batch, tokens, heads * d] seen per head), HF's padding mask
        ("SDPA, padding mask", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
         (*(torch.randn(batch, tokens, hidden).view(batch, tokens, heads, -1).transpose(1, 2) for _ in range(3)),
          torch.where(_mask(batch, tokens).bool(), 0.0, float("-inf"))[:, None, None, :].expand(batch, 1, tokens, tokens)),
         4 * batch * tokens * hidden * f32),
    ]


@torch.no_grad()
def dense() -> list[dict]:
    bandwidth = read_bandwidth()
    lines = [f"CPU: {cpu_model()}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s", "",
             "| kernel (MiniLM sizes) | eager ms | fxpress (generated C++) ms | fxpress target=cpu ms | Inductor ms "
             "| fxpress / eager | fxpress / Inductor | MB moved | fxpress % read bw | max abs error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, fn, inputs, moved in _dense_cases():
        torch._dynamo.reset()
        fns = {"eager": lambda: fn(*inputs), **_compiled(fn, args=inputs)}
        error = float((fns["fxpress"]() - fn(*inputs)).abs().max())
        t = interleaved_medians(fns, 15)
        row = {"kernel": name, **{f"{k}_ms": v * 1e3 for k, v in t.items()}, "bytes": moved,
               "read_bw_share": moved / t["fxpress"] / bandwidth, "max_abs_error": error}
        rows.append(row)
        lines.append(f"| {name} | {t['eager'] * 1e3:.2f} | {t['fxpress'] * 1e3:.2f} | "
                     f"{t['fxpress target=cpu'] * 1e3:.2f} | {t['inductor'] * 1e3:.2f} | "
                     f"**{t['fxpress'] / t['eager']:.2f}x** | {t['fxpress'] / t['inductor']:.2f}x | {moved / 1e6:.1f} | "
                     f"{100 * row['read_bw_share']:.0f}% | {error:.1e} |")
    print_table(lines, None)
    return rows


def _best_median(fn, repeats: int, rounds: int = 5) -> float:
    """The least of several medians: call overheads of microseconds on a shared machine."""
    return min(median_seconds(fn, repeats) for _ in range(rounds))


@torch.no_grad()
def overhead() -> list[dict]:
    from fxpress import workloads
    from fxpress.runtime.wrapper_cache import load_wrapper

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16)).eval()
    x = torch.randn(2, 16)
    times, reports = {"eager": _best_median(lambda: model(x), 2000)}, []
    for name, backend in (("fxpress", fxpress.Backend(fxpress.Options(), on_report=reports.append)),
                          ("inductor", "inductor")):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        compiled(x)
        times[name] = _best_median(lambda: compiled(x), 2000)
    (first, bias1), (second, bias2) = ((m.weight, m.bias) for m in (model[0], model[2]))
    wrapper = load_wrapper(reports[0].wrapper, {"fn_0_weight": first, "fn_0_bias": bias1, "fn_2_weight": second,
                                                "fn_2_bias": bias2})
    out = torch.empty(2, 16)
    t_first = first.t()
    times["wrapper module"] = _best_median(lambda: wrapper.call([x]), 2000)
    times["its ATen calls"] = _best_median(
        lambda: torch.ops.aten.addmm.default(bias2, torch.ops.aten.relu.out(
            torch.ops.aten.addmm.out(bias1, x, t_first, out=out), out=out), second.t()), 2000)
    minilm, tokenizer = workloads.load_minilm()
    ids = tokenizer(["fxpress compiles compressed transformers"] * 8, padding="max_length", max_length=128,
                    return_tensors="pt")
    torch._dynamo.reset()
    latency = interleaved_medians({"eager": lambda: minilm(**ids), **_compiled(minilm, ids)}, 25, burst=2)
    # The same with no padding: 8 rows of 128 real tokens (the attention kernel skips padded keys)
    words = workloads.lee_background().split()
    full = tokenizer([" ".join(words[150 * i:150 * (i + 1)]) for i in range(8)], padding="max_length",
                     truncation=True, max_length=128, return_tensors="pt")
    torch._dynamo.reset()
    unpadded = interleaved_medians({"eager": lambda: minilm(**full), **_compiled(minilm, full)}, 25, burst=2)
    lines = [f"CPU: {cpu_model()}", "", "| tiny graph, per call | µs | / eager |", "|---|---|---|"]
    lines += [f"| {name} | {t * 1e6:.1f} | {t / times['eager']:.2f}x |" for name, t in times.items()]
    lines += ["", f"wrapper overhead beyond its ops: {(times['wrapper module'] - times['its ATen calls']) * 1e6:.1f} µs",
              "", "| MiniLM 8 x 128 | ms | / eager | / Inductor |", "|---|---|---|---|"]
    lines += [f"| {name} | {t * 1e3:.1f} | {t / latency['eager']:.2f}x | {t / latency['inductor']:.2f}x |"
              for name, t in latency.items()]
    lines += ["", f"Above: one 6-word sentence 8 times, padded to 128 tokens. Below: 8 rows of 128 real tokens "
              f"({int(full['attention_mask'].sum())} of {full['attention_mask'].numel()} unpadded).", "",
              "| MiniLM 8 x 128, no padding | ms | / eager | / Inductor |", "|---|---|---|---|"]
    lines += [f"| {name} | {t * 1e3:.1f} | {t / unpadded['eager']:.2f}x | {t / unpadded['inductor']:.2f}x |"
              for name, t in unpadded.items()]
    print_table(lines, None)
    return [{"tiny_graph_us": {k: v * 1e6 for k, v in times.items()},
             "minilm_ms": {k: v * 1e3 for k, v in latency.items()},
             "minilm_unpadded_ms": {k: v * 1e3 for k, v in unpadded.items()}}]


if __name__ == "__main__":
    run_sections({"lut": lut, "integer": integer, "lowrank": lowrank, "dense": dense, "overhead": overhead})
