"""target="auto": the registry picks by the graph's devices — triton when every tensor is on CUDA,
cpp on the CPU when a C++ compiler works, cpu otherwise — and a compile reports the target it chose."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.codegen.targets import get_target, graph_devices
from fxpress.native import build
from tests.conftest import max_diff
from tests.tiny_models import tiny_bert, token_ids


CPU_TARGET = "cpp" if build.compiler_refusal() is None else "cpu"


@pytest.mark.parametrize("found, chosen", [({"cpu"}, CPU_TARGET), ({"cuda"}, "triton"), ({"cpu", "cuda"}, "cpu"),
                                           ({"mps"}, "cpu")])
def test_auto_picks_by_device(found, chosen):
    assert get_target("auto", found).name == chosen


def test_auto_without_a_compiler_picks_cpu(monkeypatch):
    monkeypatch.setenv("FXPRESS_CXX", "/nonexistent/c++")
    assert get_target("auto", {"cpu"}).name == "cpu"


def test_graph_devices():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    assert graph_devices(gm) == {"cpu"}  # no tensor metadata: nothing says otherwise
    for node in gm.graph.nodes:
        node.meta["val"] = torch.empty(2, device="meta")
    assert graph_devices(gm) == {"meta"}


def test_auto_on_cpu_compiles_with_a_cpu_target():
    model = tiny_bert()
    ids = token_ids(batch=2, length=7)
    reports = []
    with torch.no_grad():
        got = torch.compile(model, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append))(ids)
        expected = model(ids)
    assert reports and all(r.target == CPU_TARGET for r in reports)
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) < 1e-5


@pytest.mark.gpu
def test_auto_on_cuda_runs_generated_triton_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tiny_bert().cuda()
    ids = token_ids(batch=2, length=7).cuda()
    reports = []
    with torch.no_grad():
        got = torch.compile(model, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append))(ids)
        expected = model(ids)
    assert reports and all(r.target == "triton" for r in reports)
    assert reports[-1].generated  # generated kernels ran; the rest fell back per kernel, listed
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) < 1e-4
