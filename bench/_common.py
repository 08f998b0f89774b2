"""What the benchmarks share: the sections command line of the CPU ones
(``python bench/X.py [section ...] [--json PATH]``), a median timer, and writing a GPU table."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int, burst: int = 3) -> dict[str, float]:
    """Median wall time of each of ``fns``, taken in turns round after round so that a slow spell
    of a shared machine falls on all of them alike. A turn is one untimed call (the allocator and
    the caches settle into this function's pattern) and ``burst`` timed ones."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(burst):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def print_table(lines: list[str], markdown: Path | None) -> None:
    """Print a finished markdown table, and write it to ``markdown`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        markdown.write_text(text)


def settle_allocator() -> None:
    """Free one 30 MiB tensor first. glibc serves blocks above its mmap threshold with fresh pages
    (page faults on every touch) and raises that threshold to the size of a large block once one
    is freed: until then, the same chain of ops with 25 MB intermediates (BERT's FFN at 2048 rows)
    timed 30 % slower, so a section's baseline depended on which sections ran before it."""
    import torch

    block = torch.ones(30 * 2**20 // 4)
    del block


def run_sections(sections: dict[str, Callable[[], Any]]) -> None:
    """Run the named sections (all by default) in order; ``--json`` writes their rows."""
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("sections", nargs="*", default=list(sections), help=f"any of {list(sections)} (all)")
    parser.add_argument("--json")
    args = parser.parse_args()
    unknown = sorted(set(args.sections) - set(sections))
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {list(sections)}")
    settle_allocator()
    results = {name: run() for name, run in sections.items() if name in args.sections}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "torch": torch.__version__, **results}, f, indent=1)


def cpu_model() -> str:
    """The CPU's model name and the threads torch runs on, for result tables."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def last_level_cache_bytes() -> int:
    """The size of this CPU's last-level cache (32 MiB where Linux does not say)."""
    for index in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * scale
    return 32 << 20


def read_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
    """Bytes per second this machine reads from memory: the median of summing a large float32
    tensor (the roofline a memory-bound kernel is measured against)."""
    import torch

    x = torch.ones(megabytes * 2**20 // 4)
    return x.numel() * 4 / median_seconds(lambda: x.sum(), repeats)
