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


def print_table(lines: list[str], markdown: Path | None) -> None:
    """Print a finished markdown table, and write it to ``markdown`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        markdown.write_text(text)


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
    results = {name: run() for name, run in sections.items() if name in args.sections}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "torch": torch.__version__, **results}, f, indent=1)
