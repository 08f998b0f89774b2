"""What trust costs, on CPU, side by side in one run.

- ``threads``: all-MiniLM-L6-v2 (batch 1 x 32 tokens, the size of a web request) called from 1 and
  from 4 threads, eager and compiled: calls per second. Each compiled call takes an arena from the
  wrapper's pool (``ArenaPool``) and gives it back; beside it, the other safe design (one arena,
  calls serialised by a lock); eager allocates per call as usual.
- ``load``: an artifact of MiniLM (batch 8 x 128) loaded in a fresh process and called once, as
  ``fxpress.load`` does it (the wrapper regenerated from graph.json and checked against the
  recorded hash) and as it did before (the recorded wrapper.py imported as it is), with the time
  the regeneration itself takes.

Run: ``python bench/trust.py [threads] [load] [--json PATH]``
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import run_sections

ROOT = Path(__file__).resolve().parents[1]
THREAD_CALLS = 160


def _calls_per_second(fn, inputs, threads: int) -> float:
    import torch

    def work(n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                fn(**inputs)

    work(4)  # warm
    per_thread = THREAD_CALLS // threads
    workers = [threading.Thread(target=work, args=(per_thread,)) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per_thread * threads / (time.perf_counter() - start)


def threads() -> list[dict]:
    import torch

    from fxpress import workloads

    model = workloads.load_minilm()[0].eval()
    inputs = {"input_ids": torch.randint(0, 1000, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}
    compiled = torch.compile(model, backend="fxpress")
    lock = threading.Lock()

    def one_at_a_time(**kwargs):  # the other safe design: one arena, calls serialised by a lock
        with lock:
            return compiled(**kwargs)

    rows = []
    print("| MiniLM 1x32 | threads | calls/s | vs eager, same threads |")
    print("|---|---|---|---|")
    for n in (1, 4):
        eager = _calls_per_second(model, inputs, n)
        pooled = _calls_per_second(compiled, inputs, n)
        locked = _calls_per_second(one_at_a_time, inputs, n)
        for name, rate in (("eager", eager), ("fxpress, an arena per call from the pool", pooled),
                           ("fxpress, one arena behind a lock", locked)):
            print(f"| {name} | {n} | {rate:.1f} | {rate / eager:.2f}x |", flush=True)
        rows.append({"threads": n, "eager_calls_per_s": eager, "fxpress_pool_calls_per_s": pooled,
                     "fxpress_lock_calls_per_s": locked})
    return rows


_LOAD = """
import time; start = time.perf_counter()
import sys, torch, fxpress
from fxpress.compiler import load as load_module
regenerate = load_module._regenerated_wrapper
spent = []
def timed(*args):
    t = time.perf_counter(); source = regenerate(*args); spent.append(time.perf_counter() - t); return source
def recorded(folder, meta, files, constants):  # the way before: run wrapper.py as it is
    return files["wrapper.py"].decode()
load_module._regenerated_wrapper = timed if sys.argv[2] == "regenerate" else recorded
model = fxpress.load(sys.argv[1])
inputs = {"input_ids": torch.randint(0, 1000, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=torch.long)}
model(**inputs)
print(time.perf_counter() - start, sum(spent))
"""


def _fresh(*args: str) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", _LOAD, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    total, regenerating = done.stdout.split()[-2:]
    return float(total), float(regenerating)


def load() -> list[dict]:
    import torch

    import fxpress
    from fxpress import workloads

    model = workloads.load_minilm()[0].eval()
    inputs = {"input_ids": torch.randint(0, 1000, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    folder = Path(tempfile.mkdtemp()) / "minilm"
    fxpress.aot_compile(model, (), folder, example_kwargs=inputs)
    rows = []
    for _ in range(3):  # interleaved, so both ways meet the same machine state
        before, _ = _fresh(str(folder), "recorded")
        after, regenerating = _fresh(str(folder), "regenerate")
        rows.append({"recorded_wrapper_s": before, "regenerated_wrapper_s": after, "regeneration_s": regenerating})
    best = {k: min(r[k] for r in rows) for k in rows[0]}
    print("| MiniLM artifact, fresh process: load + 1st call | s (best of 3) |")
    print("|---|---|")
    print(f"| import the recorded wrapper.py (before) | {best['recorded_wrapper_s']:.2f} |")
    print(f"| regenerate it from graph.json and check its hash (now) | {best['regenerated_wrapper_s']:.2f} |")
    print(f"| of which regeneration | {best['regeneration_s']:.2f} |")
    print(f"| ratio now / before | {best['regenerated_wrapper_s'] / best['recorded_wrapper_s']:.2f}x |")
    return rows


if __name__ == "__main__":
    run_sections({"threads": threads, "load": load})
