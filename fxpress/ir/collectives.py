"""Functional collectives in a captured graph: what they are and what they still hold.

A model sharded with ``torch.distributed.tensor.parallel`` captures as an ATen graph with
``_c10d_functional`` ops. A collective (``all_reduce``, ``all_gather_into_tensor``, ...) returns a
tensor at once, but the communication runs on until ``wait_tensor`` is called on *that same
tensor object*; until then the collective may still read its input and write its output. So:

- a collective's output is torch's memory, never an arena slot (a copy into a slot would copy
  unfinished data and leave the wait with a tensor c10d never handed out);
- ``wait_tensor`` returns its argument: it is a view of the collective's output;
- the collective's inputs stay live until its wait, so the memory plan cannot give their memory
  to another buffer while the communication may still read them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

NAMESPACE = "_c10d_functional"


def _is_c10d(node: fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
        and target.namespace == NAMESPACE


def is_wait(node: fx.Node) -> bool:
    return _is_c10d(node) and node.target._schema.name.endswith("::wait_tensor")


def is_collective(node: fx.Node) -> bool:
    """A functional collective that starts communication (its result must be waited on)."""
    return _is_c10d(node) and not is_wait(node)


def launched_by(wait: fx.Node) -> fx.Node | None:
    """The collective whose result ``wait`` waits on (through the tuple of a coalesced one)."""
    source = wait.args[0]
    if isinstance(source, fx.Node) and source.target is operator.getitem:
        source = source.args[0]
    return source if isinstance(source, fx.Node) and is_collective(source) else None


def held_until_wait(wait: fx.Node) -> list[fx.Node]:
    """The tensors the collective ``wait`` waits on may still read: its tensor inputs."""
    collective = launched_by(wait)
    if collective is None:
        return []
    return [a for a in collective.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
