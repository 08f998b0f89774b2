from __future__ import annotations

import os

import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone, for tracing and refusals."""
    store = dist.FileStore(os.path.join(tmp_path, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
