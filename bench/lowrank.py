"""Low-rank models with and without fuse_low_rank: activation memory, latency, and accuracy.

Workloads (batch 16 for the encoders):

- ``bert-base``: a BERT-base-shaped encoder (12 layers, hidden 768, 12 heads, FFN 3072) with random
  weights, every encoder Linear factored by ``fxpress.compress.svd(rank_ratio=0.5)``, sequence
  128 / 512 / 2048 (every token attended);
- ``minilm``: all-MiniLM-L6-v2 factored the same way, activation-aware (calibrated on 64 other
  lee_background sentences), on lee_background sentences padded to 128 / 512 (its position table
  ends at 512);
- ``smollm2``: SmolLM2-135M (a rotary decoder with grouped-query attention) with activation-aware
  SVD on every attention and MLP projection, a quarter of all its parameters gone
  (``params_kept=0.75``, one rank ratio for every layer), one prefill of lee_background text
  without a KV cache, batch 1; the measured output is the decoder's last hidden state (the LM head
  is left out: at 49152 words its logits would be most of every peak).

Variants: ``dense`` (the original model), ``unfused`` (the low-rank model as written: two matmuls
per Linear) and ``fused`` (fxpress with fuse_low_rank). Each runs in its own process. The arena is
fxpress's planned activation memory (inputs, weights and outputs excluded). The measured peak is
the most tensor bytes one call holds at once (torch's profiler: allocations minus frees, in order;
on a GPU, ``torch.cuda.max_memory_allocated`` minus the memory before the call) plus, for fxpress,
the arena it holds between calls; the output counts. Latency is the median of the timed calls.
Also printed: max |fused - unfused| on the same inputs, and for MiniLM the mean cosine of its
sentence embeddings (mean pooling) to the dense model's on lee_background sentences.

Run: ``python bench/lowrank.py [--seqs 128 512 2048] [--json PATH] [--markdown PATH]``
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
BATCH = 16
RANK_RATIO = 0.5
RUNS = (("dense", "eager"), ("dense", "fxpress"), ("unfused", "eager"), ("unfused", "fxpress"),
        ("fused", "fxpress"))


def _bert_base(max_positions: int = 2048) -> Any:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        max_position_embeddings=max_positions)
    return BertModel._from_config(config, attn_implementation="sdpa").eval()


def _sentences(start: int, count: int) -> list[str]:
    from fxpress import workloads

    return workloads.lee_background().splitlines()[start:start + count]


def _dense(workload: str) -> Any:
    from fxpress import workloads

    if workload == "smollm2":
        return workloads.load_smollm2()[0]
    return _bert_base() if workload == "bert-base" else workloads.load_minilm()[0]


@functools.cache
def _smollm2_text_ids() -> Any:
    from fxpress import workloads

    return workloads.load_smollm2()[1](workloads.lee_background(), return_tensors="pt")["input_ids"]


def _smollm2_ids(start: int, seq: int) -> Any:
    """``seq`` tokens of lee_background text from token ``start`` on, as a [1, seq] batch."""
    ids = _smollm2_text_ids()
    if ids.shape[1] < start + seq:
        raise ValueError(f"lee_background has {ids.shape[1]} SmolLM2 tokens, {start + seq} asked for")
    return ids[:, start:start + seq]


def _inputs(workload: str, seq: int) -> dict[str, Any]:
    import torch

    if workload == "bert-base":
        ids = torch.randint(0, 30000, (BATCH, seq), generator=torch.Generator().manual_seed(seq))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if workload == "smollm2":
        return {"input_ids": _smollm2_ids(0, seq), "use_cache": False}
    from fxpress import workloads

    tokenizer = workloads.load_minilm()[1]
    return dict(tokenizer(_sentences(0, BATCH), padding="max_length", truncation=True, max_length=seq,
                          return_tensors="pt"))


def compress_models(folder: Path, names: list[str]) -> dict[str, str]:
    """Factor each workload once; the children load the checkpoints."""
    import torch

    from fxpress import compress, workloads

    paths = {}
    if "smollm2" in names:
        calibration = [{"input_ids": _smollm2_ids(4096 + 256 * i, 256), "use_cache": False} for i in range(4)]
        with torch.no_grad():
            smollm2 = compress.svd(workloads.load_smollm2()[0], params_kept=0.75,
                                   targets="*layers*", calibration=calibration, allocation="uniform")
        paths["smollm2"] = str(folder / "smollm2.safetensors")
        compress.save(smollm2.model, paths["smollm2"])
        print(f"smollm2: {smollm2.kept:.1%} of all parameters kept, mean calibrated output error "
              f"{statistics.mean(l.output_error for l in smollm2.layers if l.rank):.3f}", flush=True)
        if names == ["smollm2"]:
            return paths
    bert = compress.svd(_bert_base(), rank_ratio=RANK_RATIO, targets="encoder.*")
    paths["bert-base"] = str(folder / "bert-base.safetensors")
    compress.save(bert.model, paths["bert-base"])
    model, tokenizer = workloads.load_minilm()
    calibration = [dict(tokenizer(_sentences(100 + 16 * i, 16), padding=True, truncation=True,
                                  max_length=128, return_tensors="pt")) for i in range(4)]
    with torch.no_grad():
        minilm = compress.svd(model, rank_ratio=RANK_RATIO, targets="encoder.*", calibration=calibration)
    paths["minilm"] = str(folder / "minilm.safetensors")
    compress.save(minilm.model, paths["minilm"])
    print(f"bert-base: {bert.targets_kept:.1%} of encoder Linear weights kept ({bert.kept:.1%} of all "
          f"parameters); minilm: {minilm.targets_kept:.1%} ({minilm.kept:.1%}), mean calibrated output error "
          f"{statistics.mean(l.output_error for l in minilm.layers if l.rank):.3f}", flush=True)
    return paths


def _peak_live_bytes(fn: Any) -> tuple[Any, int]:
    from _memory import live_bytes

    result, peak, _ = live_bytes(fn)
    return result, peak


def measure(workload: str, seq: int, variant: str, backend: str, checkpoint: str, save_to: str | None,
            repeats: int) -> dict[str, Any]:
    """In a child process: peak bytes and latency of one call, and the plan figures."""
    import torch

    import fxpress
    from fxpress import compress

    model = _dense(workload)
    if variant != "dense":
        compress.load(model, checkpoint)
    if workload == "smollm2":
        model = model.model  # the decoder without its LM head
    kwargs = _inputs(workload, seq)
    reports: list[Any] = []
    fn = model
    if backend == "fxpress":
        disable = ["fuse_low_rank"] if variant != "fused" else []
        fn = torch.compile(model, backend=fxpress.Backend(fxpress.Options(disable=disable),
                                                          on_report=reports.append))
    with torch.no_grad():
        fn(**kwargs)  # compile and warm up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn(**kwargs).last_hidden_state
            seconds.append(time.perf_counter() - start)
        del out
        gc.collect()
        out, peak = _peak_live_bytes(lambda: fn(**kwargs).last_hidden_state)
    if save_to:
        torch.save(out, save_to)
    plan = reports[-1].plan if reports else {}
    held = plan.get("arena_bytes", 0)
    return {"peak_bytes": peak + held, "arena_bytes": held, "latency_s": statistics.median(seconds),
            "output_bytes": out.numel() * out.element_size()}


def minilm_cosine(checkpoint: str) -> float:
    """Mean cosine between dense and compressed MiniLM sentence embeddings (mean pooling)."""
    import torch

    from fxpress import compress, workloads

    dense, tokenizer = workloads.load_minilm()
    compressed = compress.load(workloads.load_minilm()[0], checkpoint)
    batch = tokenizer(_sentences(0, 64), padding=True, truncation=True, max_length=128, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        embed = lambda m: (m(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
        return float(torch.nn.functional.cosine_similarity(embed(dense), embed(compressed)).mean())


def _child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _without_output(run: dict[str, Any]) -> int:
    return run["peak_bytes"] - run["output_bytes"]


def table(results: list[dict[str, Any]], cosine: float | None) -> str:
    head = ("| workload | seq | arena dense | arena unfused | arena fused | **fused/unfused arena** "
            "| peak eager dense | peak eager unfused | peak fxpress unfused | peak fxpress fused "
            "| **fused/unfused peak** | fused/unfused peak without the output | ms eager dense "
            "| ms eager unfused | ms fxpress unfused "
            "| ms fxpress fused | max abs fused-unfused |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        m = r["runs"]
        mib = lambda key, field: f"{m[key][field] / MiB:.1f}"
        ms = lambda key: f"{m[key]['latency_s'] * 1e3:.0f}"
        lines.append(
            f"| {r['workload']} | {r['seq']} | {mib('dense/fxpress', 'arena_bytes')} "
            f"| {mib('unfused/fxpress', 'arena_bytes')} | {mib('fused/fxpress', 'arena_bytes')} "
            f"| **{m['fused/fxpress']['arena_bytes'] / m['unfused/fxpress']['arena_bytes']:.3f}** "
            f"| {mib('dense/eager', 'peak_bytes')} | {mib('unfused/eager', 'peak_bytes')} "
            f"| {mib('unfused/fxpress', 'peak_bytes')} | {mib('fused/fxpress', 'peak_bytes')} "
            f"| **{m['fused/fxpress']['peak_bytes'] / m['unfused/eager']['peak_bytes']:.3f}** "
            f"| {_without_output(m['fused/fxpress']) / _without_output(m['unfused/eager']):.3f} "
            f"| {ms('dense/eager')} | {ms('unfused/eager')} | {ms('unfused/fxpress')} | {ms('fused/fxpress')} "
            f"| {r['max_abs_fused_vs_unfused']:.2e} |")
    text = "\n".join(lines)
    text += ("\n\nMemory in MiB. Arena: planned activation memory. fused/unfused peak: measured peak of "
             "fxpress fused over eager unfused (the returned hidden states count in both; the next column "
             "leaves them out).")
    if cosine is not None:
        text += f"\nMiniLM (activation-aware SVD, 50 % of encoder Linear parameters): mean cosine to the dense " \
                f"model's sentence embeddings on 64 lee_background sentences = {cosine:.4f}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--workloads", nargs="+", default=["bert-base", "minilm"],
                        choices=["bert-base", "minilm", "smollm2"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, seq, variant, backend, checkpoint, save_to, repeats = args.child
        print(json.dumps(measure(workload, int(seq), variant, backend, checkpoint,
                                 save_to if save_to != "-" else None, int(repeats))))
        return

    import torch

    env = dict(os.environ)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoints = compress_models(folder, args.workloads)
        cosine = minilm_cosine(checkpoints["minilm"]) if "minilm" in args.workloads else None
        for workload in args.workloads:
            for seq in args.seqs:
                if workload == "minilm" and seq > 512:
                    continue  # MiniLM's position table has 512 entries
                runs = {}
                repeats = 1 if seq >= 2048 else 3
                for variant, backend in RUNS:
                    save = str(folder / f"{variant}.pt") if backend == "fxpress" and variant != "dense" else "-"
                    runs[f"{variant}/{backend}"] = _child(
                        [workload, str(seq), variant, backend, checkpoints[workload], save, str(repeats)], env)
                    print(workload, seq, variant, backend, runs[f"{variant}/{backend}"], flush=True)
                diff = (torch.load(folder / "fused.pt") - torch.load(folder / "unfused.pt")).abs().max().item()
                results.append({"workload": workload, "seq": seq, "runs": runs, "max_abs_fused_vs_unfused": diff})
    text = table(results, cosine)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "minilm_cosine": cosine}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
