"""What each rank of the tensor-parallel tests computes (module level, so spawned ranks import it).

Every worker builds the same tiny Llama on every rank, shards its attention and MLP with
torch.distributed's ``parallelize_module`` over all ranks, and returns what the test compares
with the unsharded model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fxpress
from fxpress.core.counters import delta, snapshot
from tests.tiny_models import tiny_llama, token_ids

# Megatron's split: Q/K/V and gate/up by output features, O and down by input features.
PLAN = {
    "model.layers.*.self_attn.q_proj": ColwiseParallel(),
    "model.layers.*.self_attn.k_proj": ColwiseParallel(),
    "model.layers.*.self_attn.v_proj": ColwiseParallel(),
    "model.layers.*.self_attn.o_proj": RowwiseParallel(),
    "model.layers.*.mlp.gate_proj": ColwiseParallel(),
    "model.layers.*.mlp.up_proj": ColwiseParallel(),
    "model.layers.*.mlp.down_proj": RowwiseParallel(),
}
NEW_TOKENS = 8


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    return parallelize_module(model, mesh, PLAN)


def _compiled_run(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Logits of eager and of fxpress, what explain() saw, and the fallback warnings raised."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        eager = model(input_ids=ids, use_cache=False).logits
        report = fxpress.explain(model, kwargs={"input_ids": ids, "use_cache": False})
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fxpress")(input_ids=ids, use_cache=False).logits
    return {
        "eager": eager,
        "compiled": compiled,
        "ops": [dict(g.ops_after) for g in report.graphs],
        "fallbacks": [g.fallback_reason for g in report.graphs if g.fallback_reason]
        + [str(w.message) for w in caught if issubclass(w.category, fxpress.FallbackWarning)],
        "explained_diff": report.max_abs_diff,
    }


def dense(rank: int) -> dict[str, Any]:
    ids = token_ids(2, 12)
    with torch.no_grad():
        unsharded = tiny_llama()(input_ids=ids, use_cache=False).logits
    model = sharded(tiny_llama())
    out = _compiled_run(model, ids)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="fxpress")
    out["tokens"] = model.generate(token_ids(1, 10), max_new_tokens=NEW_TOKENS, do_sample=False)
    return {**out, "unsharded": unsharded}


def quantized(rank: int) -> dict[str, Any]:
    """4-bit weights quantised shard by shard; groups of 32 never span two shards, so the codes are
    those of the unsharded model's layers."""
    ids = token_ids(2, 12)
    options = {"bits": 4, "group_size": 32, "skip": ("lm_head",)}
    with torch.no_grad():
        unsharded = fxpress.compress.quantize(tiny_llama(), **options).model(input_ids=ids, use_cache=False).logits
    model = fxpress.compress.quantize(sharded(tiny_llama()), **options).model
    return {**_compiled_run(model, ids), "unsharded": unsharded}


def low_rank(rank: int) -> dict[str, Any]:
    """Each shard factored on its own (ranks per shard), fused by fuse_low_rank."""
    ids = token_ids(2, 12)
    result = fxpress.compress.svd(sharded(tiny_llama()), rank_ratio=0.5, targets=["*self_attn*", "*mlp*"])
    return {**_compiled_run(result.model, ids), "ranks": result.ranks}


def kv_cache(rank: int) -> dict[str, Any]:
    """Greedy tokens with KIVI-4 KV held per rank (each rank its own heads), both routes."""
    policy = fxpress.KIVI(bits=4, group_size=8, residual=8)
    ids = token_ids(1, 10)
    reference = tiny_llama()
    whole = fxpress.kv_cache(reference, max_len=64, policy=policy)
    unsharded = reference.generate(ids, past_key_values=whole, max_new_tokens=NEW_TOKENS, do_sample=False)
    model = sharded(tiny_llama())
    cache = fxpress.kv_cache(model, max_len=64, policy=policy)
    model.forward = torch.compile(model.forward, backend="fxpress")
    cached = model.generate(ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
    torch._dynamo.reset()
    static = sharded(tiny_llama())
    static.forward = torch.compile(static.forward, backend=fxpress.backend(kv=policy))
    before = snapshot()
    in_graph = static.generate(ids, cache_implementation="static", max_new_tokens=NEW_TOKENS, do_sample=False)
    rewrites = delta(before).get("compress_kv_cache", {})
    return {"unsharded": unsharded, "cached": cached, "static": in_graph, "kv_bytes": cache.nbytes(),
            "unsharded_kv_bytes": whole.nbytes(),
            "rewrites": rewrites}
