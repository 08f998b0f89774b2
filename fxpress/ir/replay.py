"""Whether a graph may be captured and replayed as a CUDA graph (``Options(cuda_graphs=True)``).

A replay repeats the recorded launches on the recorded addresses and nothing else: Python does not
run. So a graph is replayable only when all it does is read its inputs and write its own buffers.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpress.ir.collectives import is_collective

# Ops whose launchers keep state on the host (the compressed KV stores, found through handle tensors
# or keyed by a buffer's storage): a replay would skip their Python and leave that state behind.
HOST_STATE_OPS = frozenset({"fxpress::cache_bind", "fxpress::cache_attend", "fxpress::kv_attend"})


def replay_refusal(gm: fx.GraphModule) -> str | None:
    """Why ``gm`` cannot be replayed as a CUDA graph, or None when it can."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if is_collective(node):
            # Replaying a collective needs every rank to capture and replay in step, and a
            # communicator that allows capture; fxpress does not arrange either.
            return f"{node.name} ({schema.name}) is a collective"
        if schema.name in HOST_STATE_OPS:
            return f"{node.name} ({schema.name}) keeps KV state on the host"
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if written:
            # Replays read and write static copies of the inputs, so an update of an input (a KV
            # cache buffer, say) would never reach the caller's tensor.
            return f"{node.name} ({node.target}) writes its argument {written[0]} in place"
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op in ("placeholder", "get_attr") and isinstance(value, torch.Tensor) \
                and value.device.type != "cuda":
            return f"{node.name} is on {value.device}, not a CUDA device"
    return None
