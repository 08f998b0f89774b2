"""Tensor-parallel models (torch.distributed's parallelize_module, 2 gloo ranks) compiled by fxpress.

Each test runs one worker of ``workers.py`` on two CPU processes and checks, on every rank: no
graph fell back, the compiled logits equal eager tensor-parallel's, and those equal the unsharded
model's (exact paths) — greedy tokens identical."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import workers
from tests.distributed.gloo import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch was built without gloo")

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _ops(rank: dict) -> dict[str, int]:
    total: dict[str, int] = {}
    for graph in rank["ops"]:
        for op, n in graph.items():
            total[op] = total.get(op, 0) + n
    return total


def _compiled_matches_eager(ranks: list[dict]) -> None:
    for r, out in enumerate(ranks):
        assert out["fallbacks"] == [], f"rank {r}: {out['fallbacks']}"
        torch.testing.assert_close(out["compiled"], out["eager"], **TOL, msg=f"rank {r}: compiled vs eager TP")
        torch.testing.assert_close(out["compiled"], ranks[0]["compiled"], msg=f"rank {r} differs from rank 0")


def test_a_sharded_dense_llama_compiles_with_its_collectives_on_every_rank():
    ranks = run_ranks(workers.dense)
    _compiled_matches_eager(ranks)
    for r, out in enumerate(ranks):
        ops = _ops(out)
        # one all-reduce after each row-parallel layer: O and down, in 2 layers
        assert ops.get("_c10d_functional.all_reduce.default") == 4, ops
        assert ops.get("_c10d_functional.wait_tensor.default") == 4, ops
        torch.testing.assert_close(out["eager"], out["unsharded"], **TOL, msg=f"rank {r}: TP vs unsharded")
        assert torch.equal(out["tokens"], ranks[0]["tokens"])
    with torch.no_grad():
        from tests.tiny_models import tiny_llama, token_ids
        expected = tiny_llama().generate(token_ids(1, 10), max_new_tokens=workers.NEW_TOKENS, do_sample=False)
    assert torch.equal(ranks[0]["tokens"], expected)


def test_4bit_shards_run_as_lut_linear_and_match_the_unsharded_quantised_model():
    ranks = run_ranks(workers.quantized)
    _compiled_matches_eager(ranks)
    for r, out in enumerate(ranks):
        ops = _ops(out)
        assert ops.get("fxpress.lut_linear.default") == 14, ops  # 7 sharded layers x 2
        assert "fxpress.dequantize_planes.default" not in ops, ops
        torch.testing.assert_close(out["eager"], out["unsharded"], **TOL, msg=f"rank {r}: TP vs unsharded")


def test_factored_shards_fuse_into_low_rank_kernels():
    ranks = run_ranks(workers.low_rank)
    _compiled_matches_eager(ranks)
    for out in ranks:
        ops = _ops(out)
        assert ops.get("fxpress.lowrank_attention.default") == 2, ops
        assert ops.get("fxpress.lowrank_ffn.default") == 2, ops
        assert ops.get("_c10d_functional.all_reduce.default") == 4, ops
        # rank_ratio 0.5 of each 32-feature shard of a 64-input Q projection
        assert out["ranks"]["model.layers.0.self_attn.q_proj"] == int(0.5 * 64 * 32 / 96)


def test_each_rank_keeps_its_own_heads_compressed_kv():
    ranks = run_ranks(workers.kv_cache)
    for r, out in enumerate(ranks):
        assert torch.equal(out["cached"], out["unsharded"]), f"rank {r}: fxpress.kv_cache route"
        assert torch.equal(out["static"], out["unsharded"]), f"rank {r}: compress_kv_cache route"
        assert out["rewrites"], f"rank {r}: compress_kv_cache rewrote nothing"
    # the tiny Llama's 2 KV heads, one per rank
    assert ranks[0]["kv_bytes"] == ranks[1]["kv_bytes"] == ranks[0]["unsharded_kv_bytes"] // 2
