"""Graph checks run after each pass when checking is on (``FXPRESS_CHECK=1`` or ``check=True``).

A pass must leave the graph lint-clean with valid ``meta["val"]`` on every node. The check
re-derives each node's metadata from its inputs under the graph's own FakeTensorMode and compares
dtype and sizes with what the pass recorded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


class _Reprop(FakeTensorProp):
    """FakeTensorProp that turns frozen weights (real tensors behind get_attr) into fakes."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{v.dtype}{list(v.shape)}"
    return repr(v)


def _agree(old: Any, new: Any) -> bool:
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        return old.dtype == new.dtype and [str(s) for s in old.shape] == [str(s) for s in new.shape]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_agree(a, b) for a, b in zip(old, new))
    return True  # SymInts and None: nothing shape-like to compare


def verify_graph(gm: fx.GraphModule) -> None:
    """Raise ``AssertionError`` naming the first node whose graph or metadata is broken."""
    gm.graph.lint()
    missing = [n.name for n in gm.graph.nodes if n.op not in ("output", "get_attr") and "val" not in n.meta]
    if missing:
        raise AssertionError(f"nodes without meta['val']: {missing[:5]}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([n.meta["val"] for n in placeholders] + [
        n.meta["val"] for n in gm.graph.nodes if n.op == "call_function"
    ])
    if mode is None:
        return
    recorded = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
    prop = _Reprop(gm, mode)
    prop._mode = mode
    try:
        prop.propagate_dont_convert_inputs(*[n.meta["val"] for n in placeholders])
    finally:
        fresh = {n: n.meta.get("val") for n in gm.graph.nodes}
        for n, v in recorded.items():  # keep the pass's own metadata; we only compare
            n.meta["val"] = v
    for node, old in recorded.items():
        if not _agree(old, fresh.get(node)):
            raise AssertionError(
                f"node {node.name} ({node.target}) records {_describe(old)} but computes "
                f"{_describe(fresh.get(node))}"
            )
