"""The command line the CPU benchmarks share: ``python bench/X.py [section ...] [--json PATH]``."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable


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
