"""A target registered from this file alone: it "generates" each pointwise kernel as a Python
function of ATen calls that writes its outputs into their slots. MiniLM compiled with it gives
eager's result, and its kernels are the ones the wrapper runs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx

import fxpress
from fxpress.codegen.render import call
from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets import GeneratedKernel, Target, register_target, unregister_target

from tests.conftest import max_diff


class AtenCallsTarget(Target):
    name = "toy_aten_calls"

    def __init__(self) -> None:
        self.lowered: list[str] = []

    def lower(self, kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel | str:
        if kernel.kind != "pointwise":
            return f"the toy target generates pointwise kernels only, not {kernel.kind}"
        members = [nodes[n] for n in kernel.nodes]
        inputs = list(dict.fromkeys(a.name for n in members for a in n.all_input_nodes if a not in members))
        names = {n.name: f"v_{n.name}" for n in members}
        body = [f"    v_{n.name} = {call(n, names=names)}" for n in members]
        body += [f"    out_{w}.copy_(v_{w})" for w in kernel.writes]
        params = inputs + [f"out_{w}" for w in kernel.writes]
        source = "\n".join([f"def {kernel.name}({', '.join(params)}):", *body]) + "\n"
        self.lowered.append(kernel.name)
        return GeneratedKernel(kernel.name, source, tuple(inputs), kernel.writes,
                               launch=f"{kernel.name}({', '.join(inputs + list(kernel.writes))})")


@pytest.fixture
def toy_target():
    target = register_target(AtenCallsTarget())
    yield target
    unregister_target(target.name)


@pytest.mark.real_model
def test_minilm_compiles_and_runs_on_a_target_registered_here(minilm, toy_target):
    model, tokenizer = minilm
    batch = dict(tokenizer(["a target is one object", "registered from a test file"], padding=True,
                           return_tensors="pt"))
    reports = []
    backend = fxpress.Backend(fxpress.Options(target=toy_target.name, strict=True), on_report=reports.append)
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        got = torch.compile(model, backend=backend)(**batch).last_hidden_state
    assert max_diff(got, expected) < 1e-4
    report = reports[-1]
    assert report.target == toy_target.name
    pointwise = {name for name, kind, _ in report.kernels if kind == "pointwise"}
    assert pointwise and set(report.generated) == pointwise == set(toy_target.lowered)
    assert all(report.generated[name].startswith(f"def {name}(") for name in pointwise)
    for name in pointwise:  # the wrapper calls the generated function, not the ATen ops inline
        assert re.search(rf"^\s+{name}\(", report.wrapper, re.M), name
    assert any("pointwise kernels only" in why for why in report.not_generated.values())


def test_an_unregistered_target_is_refused_naming_the_registered_ones(toy_target):
    with pytest.raises(fxpress.OptionError, match="toy_aten_calls"):
        fxpress.backend(target="no_such_target")
    unregister_target(toy_target.name)
    with pytest.raises(fxpress.OptionError, match="option target='toy_aten_calls'"):
        fxpress.backend(target=toy_target.name)
    register_target(toy_target)
