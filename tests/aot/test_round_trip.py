"""Artifacts round-trip: compiled here, loaded in a fresh process, equal to the in-process compile.

The fresh process imports only fxpress and the artifact (plus transformers where the outputs are
its ModelOutput classes); inputs and outputs cross over as safetensors files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxpress
from tests.aot.models import decode_step, greedy
from tests.tiny_models import tiny_bert, tiny_llama, token_ids

ROOT = Path(__file__).resolve().parents[2]

_RUN = """
import sys, torch, fxpress
from safetensors.torch import load_file, save_file
model = fxpress.load(sys.argv[1])
inputs = {k: v.to(model.meta["device"]) for k, v in load_file(sys.argv[2]).items()}
out = model(**inputs)
leaves = torch.utils._pytree.tree_leaves(out)
save_file({str(i): t.contiguous().cpu() for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}, sys.argv[3])
"""

_GENERATE = """
import json, sys, fxpress
from tests.aot.models import greedy
model = fxpress.load(sys.argv[1])
print(json.dumps([greedy(model, json.loads(sys.argv[2]), int(sys.argv[3])) for _ in range(2)]))
"""


def fresh_process(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_fresh(path: Path, inputs: dict[str, torch.Tensor], tmp_path: Path) -> list[torch.Tensor]:
    save_file(inputs, tmp_path / "inputs.safetensors")
    fresh_process(_RUN, path, tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors")
    outputs = load_file(tmp_path / "outputs.safetensors")
    return [outputs[str(i)] for i in range(len(outputs))]


def compiled_here(model, inputs: dict[str, torch.Tensor], **options) -> list[torch.Tensor]:
    with torch.no_grad():
        out = torch.compile(model, backend=fxpress.backend(**options))(**inputs)
    return [t.cpu() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_tiny_bert_with_a_dynamic_sequence_length(tmp_path):
    model = tiny_bert()
    seq = torch.export.Dim("seq", min=2, max=64)
    path = fxpress.aot_compile(model, (), tmp_path / "bert", dynamic_shapes={"input_ids": {1: seq}},
                               example_kwargs={"input_ids": token_ids(2, 12)})
    for length in (12, 20):
        inputs = {"input_ids": token_ids(2, length)}
        assert_same(run_fresh(path, inputs, tmp_path), compiled_here(model, inputs))


@pytest.mark.real_model
def test_minilm(minilm, tmp_path):
    model, tokenizer = minilm
    batch = dict(tokenizer(["fxpress writes artifacts", "and loads them again elsewhere"], padding="max_length",
                           max_length=32, return_tensors="pt"))
    path = fxpress.aot_compile(model, (), tmp_path / "minilm", example_kwargs=batch)
    assert_same(run_fresh(path, batch, tmp_path), compiled_here(model, batch))


def test_packed_forms_are_stored_not_recomputed(tmp_path):
    """LUT bit-planes and low-rank factors are the artifact's weights; no dense weight is left."""
    base = tiny_llama()
    base.config.use_cache = False  # a forward without a cache returns logits only
    low_rank = fxpress.compress.svd(base, rank_ratio=0.25).model
    quantized = fxpress.compress.quantize(base, bits=4, group_size=32).model
    ids = {"input_ids": token_ids(1, 8)}
    for name, model, op in (("lowrank", low_rank, "fxpress.lowrank_"), ("lut", quantized, "fxpress.lut_linear")):
        path = fxpress.aot_compile(model, (), tmp_path / name, example_kwargs=ids)
        meta = json.loads((path / "meta.json").read_text())
        assert any(key.startswith(op) for key in meta["ops"]), meta["ops"]
        stored = load_file(path / "weights.safetensors")
        dense = [k for k, t in stored.items() if t.dim() == 2 and t.shape == (128, 64) and "proj" in k]
        assert not dense, f"dense projection weights in the {name} artifact: {dense}"
        if name == "lut":
            assert any(t.dtype == torch.int32 for t in stored.values())
        assert_same(run_fresh(path, ids, tmp_path), compiled_here(model, ids))


@pytest.mark.parametrize("policy", [fxpress.FullKV(), fxpress.KIVI(bits=4, group_size=16, residual=16),
                                    fxpress.ThinKV(ratio=0.5, window=4, kivi=fxpress.KIVI(bits=4, group_size=8,
                                                                                          residual=4))],
                         ids=["full", "kivi4", "think_kivi4"])
def test_kv_compressed_decoder_loads_and_generates(policy, tmp_path):
    model = tiny_llama()
    path = fxpress.aot_compile(decode_step(model), (), tmp_path / "step", kv=policy,
                               example_kwargs={"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([0])})
    meta = json.loads((path / "meta.json").read_text())
    assert [s["policy"]["class"] for s in meta["kv_states"]] == [type(policy).__name__] * 2
    prompt = [3, 17, 9, 40, 2, 77]
    with torch.no_grad():
        expected = greedy(torch.compile(decode_step(model), backend=fxpress.backend(kv=policy)), prompt, 12)
    # twice in one process: a new sequence restarts the compressed state at position 0
    assert json.loads(fresh_process(_GENERATE, path, json.dumps(prompt), 12)) == [expected, expected]


@pytest.mark.real_model
def test_smollm2_decode_step_with_kivi(smollm2, tmp_path):
    model, tokenizer = smollm2
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids[0].tolist()
    policy = fxpress.KIVI(bits=4, group_size=32, residual=32)
    path = fxpress.aot_compile(decode_step(model, max_len=48), (), tmp_path / "smollm2", kv=policy,
                               example_kwargs={"input_ids": torch.tensor([[1]]), "cache_position": torch.tensor([0])})
    with torch.no_grad():
        expected = greedy(torch.compile(decode_step(model, max_len=48), backend=fxpress.backend(kv=policy)),
                          prompt, 8)
    assert json.loads(fresh_process(_GENERATE, path, json.dumps(prompt), 8)) == [expected, expected]


@pytest.mark.gpu
def test_triton_artifact_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, ids = tiny_bert().cuda(), token_ids(2, 12)
    path = fxpress.aot_compile(model, (), tmp_path / "bert", example_kwargs={"input_ids": ids.cuda()},
                               target="triton")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["device"].startswith("cuda") and any(k["generated"] for k in meta["kernels"])
    assert_same(run_fresh(path, {"input_ids": ids}, tmp_path),
                compiled_here(model, {"input_ids": ids.cuda()}, target="triton"))


def test_cuda_graph_replay_is_refused_where_it_cannot_run(tmp_path):
    """On the CPU, and for a decoder keeping KV state, load(cuda_graphs=True) runs plainly and says why."""
    model = tiny_bert()
    path = fxpress.aot_compile(model, (), tmp_path / "bert", example_kwargs={"input_ids": token_ids(2, 12)})
    loaded = fxpress.load(path, cuda_graphs=True)
    assert loaded.cuda_graphs.startswith("off: ") and "not a CUDA device" in loaded.cuda_graphs
    assert fxpress.load(path).cuda_graphs == ""
    with torch.no_grad():
        got = loaded(input_ids=token_ids(2, 12))
    assert_same(list(got[:1]), compiled_here(model, {"input_ids": token_ids(2, 12)})[:1])
    step = fxpress.aot_compile(decode_step(tiny_llama()), (), tmp_path / "step", kv=fxpress.FullKV(),
                               example_kwargs={"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([0])})
    meta = json.loads((step / "meta.json").read_text())
    from fxpress.compiler.load import _replay_refusal

    assert "KV state" in _replay_refusal(meta, torch.device("cuda"))


@pytest.mark.gpu
def test_a_cuda_artifact_replays_as_cuda_graphs(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tiny_bert().cuda()
    path = fxpress.aot_compile(model, (), tmp_path / "bert", example_kwargs={"input_ids": token_ids(2, 12).cuda()},
                               target="triton")
    loaded = fxpress.load(path, cuda_graphs=True)
    assert loaded.cuda_graphs == "on"
    with torch.no_grad():
        for seed in range(3):  # seen, captured, replayed
            ids = token_ids(2, 12, seed=seed).cuda()
            torch.testing.assert_close(loaded(input_ids=ids)[0], model(ids).last_hidden_state, atol=1e-4, rtol=1e-4)
    assert fxpress.counters["cuda_graphs"]["replays"] >= 2
