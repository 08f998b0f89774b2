"""Run a function on N CPU processes joined by a gloo process group, and collect what each returns.

Each rank runs ``fn(rank)`` after ``init_process_group("gloo")`` over a file store in a fresh
temporary folder (no ports to collide between concurrent test runs) and returns a dict of
tensors and plain values, saved by the rank and read back here, in rank order. An exception on
any rank fails the call with that rank's traceback (torch.multiprocessing.spawn).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[[int], dict[str, Any]], world_size: int, folder: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    store = dist.FileStore(os.path.join(folder, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[[int], dict[str, Any]], world_size: int = 2) -> list[dict[str, Any]]:
    """``[fn(0), ..., fn(world_size - 1)]``, each computed in its own process of one gloo group.
    ``fn`` must be importable by name (a module-level function)."""
    with tempfile.TemporaryDirectory(prefix="fxpress-gloo-") as folder:
        mp.spawn(_entry, args=(fn, world_size, folder), nprocs=world_size, join=True)
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
