"""Memory plan figures and measured peak memory, for MiniLM (batch 8 x 128) and SmolLM2 (prefill 512).

For each workload: fxpress's planned arena against its lower bound (most bytes live at once) and
against naive allocation (every buffer its own), and the measured peak of one call under eager,
fxpress (cpu target) and Inductor, on the same inputs. The peak is measured by the kernel: each
backend runs in its own process with a fixed malloc mmap threshold (so freed buffers return to
the OS), the peak-RSS counter is reset after compiling and warming up (``/proc/self/clear_refs``),
and the call's peak is ``VmHWM`` minus the resident size before it, plus, for fxpress, the arena
it holds between calls. Outputs count in every column.

Run: ``python bench/plan.py [--json PATH]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Any, Callable

WORKLOADS = ("MiniLM 8x128", "SmolLM2 prefill 512")
BACKENDS = ("eager", "fxpress", "inductor")
MiB = 1 << 20


def _inputs(workload: str) -> tuple[Any, dict[str, Any]]:
    from fxpress import workloads

    text = workloads.lee_background()
    if workload == "MiniLM 8x128":
        model, tokenizer = workloads.load_minilm()
        batch = tokenizer(text.splitlines()[:8], padding="max_length", truncation=True,
                          max_length=128, return_tensors="pt")
        return model, dict(batch)
    model, tokenizer = workloads.load_smollm2()
    return model, {"input_ids": tokenizer(text, return_tensors="pt").input_ids[:, :512]}


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        line = next(l for l in fh if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure_peak(workload: str, backend: str) -> dict[str, Any]:
    """Runs in a child process: the peak bytes one call adds, and fxpress's plan figures."""
    import torch

    import fxpress

    torch._inductor.config.fx_graph_cache = False
    model, kwargs = _inputs(workload)
    reports: list[Any] = []
    fn: Callable[..., Any] = model
    if backend == "fxpress":
        fn = torch.compile(model, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append))
    elif backend == "inductor":
        fn = torch.compile(model, backend="inductor")
    with torch.no_grad():
        fn(**kwargs)  # compile and warm up
        fn(**kwargs)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident size
        before = _status("VmRSS")
        out = fn(**kwargs)
        peak = _status("VmHWM") - before
    del out
    plan = reports[-1].plan if reports else {}
    # fxpress keeps its arena between calls, so it was resident before this call: count it.
    held = plan.get("arena_bytes", 0)
    return {"peak_bytes": peak + held, "arena_held_bytes": held, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_peak(*args.child)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    results: dict[str, dict[str, Any]] = {}
    for workload in WORKLOADS:
        results[workload] = {}
        for backend in BACKENDS:
            done = subprocess.run([sys.executable, __file__, "--child", workload, backend],
                                  capture_output=True, text=True, env=env, check=True)
            results[workload][backend] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"{'workload':<20} {'arena MiB':>9} {'/lower bound':>12} {'/naive':>7}   "
          f"{'peak eager':>10} {'peak fxpress':>12} {'peak inductor':>13} {'fxpress/eager':>13}")
    for workload, r in results.items():
        plan = r["fxpress"]["plan"]
        peaks = {b: r[b]["peak_bytes"] / MiB for b in BACKENDS}
        print(f"{workload:<20} {plan['arena_bytes'] / MiB:>9.1f} "
              f"{plan['arena_bytes'] / plan['lower_bound_bytes']:>12.3f} "
              f"{plan['arena_bytes'] / plan['naive_bytes']:>7.3f}   {peaks['eager']:>8.1f}Mi "
              f"{peaks['fxpress']:>10.1f}Mi {peaks['inductor']:>11.1f}Mi "
              f"{peaks['fxpress'] / peaks['eager']:>13.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
