"""What fxpress refuses about sharded models, each with the reason, in a one-rank gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.fx.experimental.proxy_tensor import make_fx

import fxpress
from fxpress.compress.sharded_linear import ShardingError
from fxpress.core.errors import UnsupportedGraphError
from fxpress.ir.replay import replay_refusal
from tests.distributed.test_collective_plan import _gather_then_compute
from tests.distributed.workers import sharded
from tests.tiny_models import tiny_llama, token_ids

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch was built without gloo")


def test_a_sharded_model_is_not_saved_as_an_artifact(one_rank_group, tmp_path):
    with pytest.raises(UnsupportedGraphError, match=r"q_proj\.weight is a DTensor.*cannot be saved"):
        fxpress.aot_compile(sharded(tiny_llama(1)), (), tmp_path / "m.fxpress",
                            example_kwargs={"input_ids": token_ids(), "use_cache": False})


def test_a_graph_with_a_collective_is_not_replayed_as_a_cuda_graph(one_rank_group):
    gm = make_fx(_gather_then_compute(one_rank_group))(torch.randn(8, 4))
    assert "is a collective" in replay_refusal(gm)


def test_compressing_a_layer_sharded_over_a_2d_mesh_is_refused_by_name(one_rank_group):
    mesh = init_device_mesh("cpu", (1, 1))
    model = nn.Sequential(nn.Linear(64, 64))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0), Replicate()]),
                                   requires_grad=False)
    with pytest.raises(ShardingError, match=r"^0: only 1-D device meshes"):
        fxpress.compress.quantize(model, bits=4, group_size=32)
