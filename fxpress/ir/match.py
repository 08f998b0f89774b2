"""Helpers shared by the rewrite passes: node predicates, rule tables and fake-tensor metadata.

A rule is named by the rewrite it performs. Its ``match`` reads only the graph and ``meta["val"]``
and returns a :class:`Match` (nothing changed yet), a :class:`Miss` naming why a candidate was
refused, or ``None`` where the node is not a candidate at all. Only after a full match does
``replace`` edit the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.operator_schemas import normalize_function
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpress.core.counters import counters
from fxpress.core.logs import rule_log

aten = torch.ops.aten


@dataclass
class Match:
    """What a rule found: the nodes to remove, the anchor to replace, and named operands."""

    root: fx.Node
    nodes: list[fx.Node]
    operands: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Miss:
    """A candidate the rule refused, and the first reason why."""

    node: fx.Node
    reason: str


@dataclass(frozen=True)
class Rule:
    name: str
    match: Callable[[fx.Node], Match | Miss | None]
    replace: Callable[[fx.GraphModule, Match], fx.Node]


def apply_rules(gm: fx.GraphModule, rules: Iterable[Rule], group: str) -> int:
    """Try every rule on every node once, in graph order; return how many rewrites were made.

    Each rewrite bumps ``counters[group][rule.name]``; each refused candidate bumps
    ``counters[group]["<rule.name> [not applied: <reason>]"]`` and is logged at debug level.
    """
    rewrites = 0
    for rule in rules:
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:  # erased by an earlier rewrite
                continue
            found = rule.match(node)
            if found is None:
                continue
            if isinstance(found, Miss):
                counters[group][f"{rule.name} [not applied: {found.reason}]"] += 1
                rule_log.debug("%s: %s at %s: %s", group, rule.name, found.node.name, found.reason)
                continue
            new = rule.replace(gm, found)
            new.meta.setdefault("stack_trace", found.root.meta.get("stack_trace"))
            found.root.replace_all_uses_with(new)
            for dead in reversed(found.nodes):
                if not dead.users:
                    gm.graph.erase_node(dead)
            counters[group][rule.name] += 1
            rewrites += 1
    if rewrites:
        gm.recompile()
    return rewrites


def is_op(node: Any, *targets: Any) -> bool:
    """``node`` calls one of ``targets`` (an OpOverload, or an OpOverloadPacket for any overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return any(node.target is t or packet is t for t in targets)


def val(node: Any) -> Any:
    """The FakeTensor (or SymInt) a node produces, or the literal itself for non-nodes."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def same_size(a: Any, b: Any) -> bool:
    """Sizes provably equal, symbolic ones included (never adds a guard)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def is_last_dim(dims: Any, ndim: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def insert_call(
    gm: fx.GraphModule, before: fx.Node, target: Any, args: tuple, kwargs: dict | None = None
) -> fx.Node:
    """Insert ``target(*args)`` before ``before`` with ``meta["val"]`` computed under fake mode."""
    kwargs = kwargs or {}
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = torch.utils._pytree.tree_map_only(fx.Node, val, (args, kwargs))
    mode = detect_fake_mode(torch.utils._pytree.tree_leaves((fake_args, fake_kwargs)))
    if mode is None:
        raise RuntimeError(f"no FakeTensor metadata on the operands of {before.name}")
    fake_args, fake_kwargs = torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t if isinstance(t, torch._subclasses.FakeTensor) else mode.from_tensor(t),
        (fake_args, fake_kwargs),
    )
    with mode:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def add_constant(gm: fx.GraphModule, before: fx.Node, name: str, tensor: torch.Tensor) -> fx.Node:
    """A frozen constant (a non-persistent buffer read by ``get_attr``) with fake metadata."""
    attr = name
    while hasattr(gm, attr):
        attr += "_"
    gm.register_buffer(attr, tensor, persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(attr)
    mode = torch._guards.detect_fake_mode([val(n) for n in before.all_input_nodes])
    # static_shapes: a constant's sizes are known; a fake mode with a shape environment would give
    # them fresh symbols that no wrapper input binds.
    node.meta["val"] = mode.from_tensor(tensor, static_shapes=True) if mode is not None else tensor
    return node


# Scaled dot-product attention as capture leaves it: the public op, or the backend it dispatched to.
SDPA_OPS = (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
            aten._scaled_dot_product_flash_attention, aten.scaled_dot_product_attention)


def sdpa_arguments(node: fx.Node) -> dict[str, Any] | None:
    """An SDPA node's arguments by name (``query``, ``key``, ``value``, ``attn_mask`` or
    ``attn_bias``, ``dropout_p``, ``is_causal``, ``scale``); None if they cannot be read."""
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return None if bound is None else bound.kwargs


def sdpa_result(node: fx.Node) -> fx.Node | Miss | None:
    """The node holding an SDPA node's attention output: itself for the public op, else its one
    ``getitem(0)``; a Miss when the backend's statistics (logsumexp) are read too."""
    if node.target is aten.scaled_dot_product_attention:
        return node
    users = list(node.users)
    if not users or any(not (u.target is operator.getitem and u.args[1] == 0) for u in users):
        return Miss(node, "attention statistics (logsumexp) are used")
    return users[0] if len(users) == 1 else None
