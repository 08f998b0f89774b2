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


class _Recheck(fx.Interpreter):
    """Runs the graph on FakeTensors and stops at the first node whose recorded metadata
    disagrees with what its op computes from its inputs."""

    def __init__(self, gm: fx.GraphModule, mode: Any):
        super().__init__(gm)
        self.mode = mode

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self.mode.from_tensor(value, static_shapes=True)
        return value

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return node.meta["val"]
        try:
            with self.mode:
                fresh = super().run_node(node)
        except Exception as e:
            raise AssertionError(f"node {node.name} ({node.target}) cannot run on its inputs: {e}") from e
        if node.op != "output" and not _agree(node.meta.get("val"), fresh):
            raise AssertionError(
                f"node {node.name} ({node.target}) records {_describe(node.meta.get('val'))} "
                f"but computes {_describe(fresh)}"
            )
        return fresh


def verify_graph(gm: fx.GraphModule) -> None:
    """Raise ``AssertionError`` naming the first node whose graph or metadata is broken."""
    gm.graph.lint()
    missing = [n.name for n in gm.graph.nodes if n.op not in ("output", "get_attr") and "val" not in n.meta]
    if missing:
        raise AssertionError(f"nodes without meta['val']: {missing[:5]}")
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if "val" in n.meta])
    if mode is not None:
        _Recheck(gm, mode).run()
