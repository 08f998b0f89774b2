"""Targets by name: ``fxpress.backend(target=name)``, artifacts' ``meta.json``, and ``"auto"``."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from fxpress.codegen.targets.base import Target
from fxpress.core.errors import OptionError

_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Make ``target`` available by its name; a name is registered once."""
    if not target.name or target.name == "auto":
        raise ValueError(f"a target needs a name other than 'auto', got {target.name!r}")
    if target.name in _TARGETS:
        raise ValueError(f"a target named {target.name!r} is already registered")
    _TARGETS[target.name] = target
    return target


def unregister_target(name: str) -> None:
    _TARGETS.pop(name, None)


def target_names() -> tuple[str, ...]:
    return ("auto", *_TARGETS)


def resolve_target(name: str, devices: Iterable[str] = ("cpu",)) -> tuple[Target, list[str]]:
    """``get_target``, and for ``"auto"`` why each higher-ranked target was passed over."""
    if name != "auto":
        return get_target(name), []
    devices = frozenset(devices)
    passed_over = []
    ranked = sorted((t for t in _TARGETS.values() if t.auto_rank is not None and t.runs_devices(devices)),
                    key=lambda t: -t.auto_rank)
    for target in ranked:
        refusal = target.auto_refusal()
        if refusal is None:
            return target, passed_over
        passed_over.append(f"target='auto' did not pick {target.name}: {refusal}")
    raise OptionError(f"fxpress option target='auto': no registered target runs devices {sorted(devices)}")


def get_target(name: str, devices: Iterable[str] = ("cpu",)) -> Target:
    """The target registered as ``name``. ``"auto"``: the highest-ranked target that runs a graph on
    ``devices`` (device types: triton for CUDA graphs, cpp on CPU where a C++ compiler works, cpu
    otherwise)."""
    if name == "auto":
        return resolve_target(name, devices)[0]
    target = _TARGETS.get(name)
    if target is None:
        valid = ", ".join(repr(n) for n in target_names())
        raise OptionError(f"fxpress option target={name!r} is invalid: expected one of {valid} "
                          "(targets registered with fxpress.codegen.targets.register_target)")
    return target


def graph_devices(gm: fx.GraphModule) -> frozenset[str]:
    """The device types of the tensors a graph holds; a graph of no tensors runs on the cpu."""
    found = {n.meta["val"].device.type for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    return frozenset(found or {"cpu"})
