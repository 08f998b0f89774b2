"""The memory plan around functional collectives, on a graph traced in a one-rank gloo group:
a collective's output is never an arena slot, and its input stays live until its wait."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.fx.experimental.proxy_tensor import make_fx

from fxpress.codegen.plan_memory import plan_memory
from fxpress.codegen.schedule import build_schedule

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch was built without gloo")


# renamed in torch 2.13; the device machine's older torch has only the old name
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _gather_then_compute(group):
    def f(x):
        y = x * 2  # an arena buffer the gather reads
        gathered = _all_gather(y, 0, group)
        z = torch.relu(x + 1)  # wants memory while the gather may still read y
        w = z * 3
        return gathered.sum(0) + w.sum(0)
    return f


def test_a_collective_input_lives_until_its_wait_and_its_output_is_not_planned(one_rank_group):
    x = torch.randn(64, 32)
    gm = make_fx(_gather_then_compute(one_rank_group))(x)
    gather = next(n for n in gm.graph.nodes if "all_gather" in str(n.target))
    wait = next(n for n in gm.graph.nodes if "wait_tensor" in str(n.target))
    schedule = build_schedule(gm)
    plan = plan_memory(schedule)

    assert schedule.buffers[gather.name].role == "collective"
    assert gather.name not in plan.slots
    assert schedule.buffers[wait.name].alias_of == gather.name
    y = gather.args[0].name
    assert y in plan.slots
    wait_position = next(p for p, k in enumerate(plan.order)
                         if wait.name in next(kk.nodes for kk in schedule.kernels if kk.name == k))
    assert plan.slots[y].end >= wait_position
    # nothing planned while the gather may read y shares its bytes
    for name, slot in plan.slots.items():
        if name != y and slot.start <= plan.slots[y].end and slot.end >= plan.slots[y].start:
            lo, hi = int(slot.offset), int(slot.offset + slot.nbytes)
            y_lo, y_hi = int(plan.slots[y].offset), int(plan.slots[y].offset + plan.slots[y].nbytes)
            assert hi <= y_lo or lo >= y_hi, f"{name} overlaps {y} while the gather may read it"


def test_compiled_collectives_give_eager_results(one_rank_group):
    f = _gather_then_compute(one_rank_group)
    x = torch.randn(64, 32)
    compiled = torch.compile(f, backend="fxpress")
    torch.testing.assert_close(compiled(x), f(x))
