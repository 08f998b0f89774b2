"""Compressed models through transformers' own save_pretrained / from_pretrained (the quantization
config and quantizer fxpress registers): the same layers, the same logits, the same rewrites."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxpress
import fxpress.hf.quantizer  # noqa: F401  (registers quant_method "fxpress")
from fxpress.compress import LowRankLinear, QuantizedLinear
from fxpress.compress.layer_records import rebuild
from tests.tiny_models import tiny_llama, token_ids

ROOT = Path(__file__).resolve().parents[2]


def _compressed(kind: str) -> torch.nn.Module:
    model = tiny_llama().eval()
    if kind == "lowbit":
        return fxpress.compress.quantize(model, bits=4, group_size=32).model
    if kind == "lowrank":
        return fxpress.compress.svd(model, rank_ratio=0.5).model
    attention = fxpress.compress.quantize(model, bits=3, group_size=32, targets="*self_attn*").model
    return fxpress.compress.svd(attention, rank_ratio=0.5, targets="*mlp*").model  # both kinds in one model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["lowbit", "lowrank", "both"])
def test_round_trip_gives_the_same_layers_and_logits(kind, tmp_path):
    model = _compressed(kind)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fxpress" and config["layers"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, record in config["layers"].items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantizedLinear if record["kind"] == "lowbit" else LowRankLinear), name
        if record["kind"] == "lowbit":  # the scales keep the dtype they were stored in (float16)
            assert layer.alpha.dtype == model.get_submodule(name).alpha.dtype == torch.float16, name
    ids = token_ids(2, 9)
    assert _logits(loaded, ids).equal(_logits(model, ids))


def test_loaded_model_compiles_into_the_same_rewrites(tmp_path):
    model = _compressed("both")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = token_ids(1, 8)
    ops = {}
    for name, m in (("saved", model), ("loaded", loaded)):
        report = fxpress.explain(m, ids)
        ops[name] = {op for g in report.graphs for op in g.ops_after if op.startswith("fxpress.")}
    assert ops["loaded"] == ops["saved"] and {"fxpress.lut_linear.default"} <= ops["loaded"], ops
    assert any(op.startswith("fxpress.lowrank_") for op in ops["loaded"]), ops
    compiled = torch.compile(loaded, backend="fxpress")
    assert (_logits(compiled, ids) - _logits(model, ids)).abs().max() < 1e-4


def test_a_fresh_process_loads_after_importing_the_quantizer(tmp_path):
    model = _compressed("lowbit")
    model.save_pretrained(tmp_path)
    ids = token_ids(1, 6)
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch, fxpress.hf.quantizer\n"
              "from transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
              "with torch.no_grad():\n"
              "    torch.save(m(torch.load(sys.argv[1] + '/ids.pt')).logits, sys.argv[1] + '/logits.pt')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(tmp_path / "logits.pt").equal(_logits(model, ids))


def test_records_that_do_not_fit_the_model_are_refused():
    model = tiny_llama()
    record = {"kind": "lowbit", "in_features": 64, "out_features": 64, "bits": 4, "group_size": 32, "bias": False}
    with pytest.raises(ValueError, match="'model.layers.0.nope' is not in the LlamaForCausalLM"):
        rebuild(model, {"model.layers.0.nope": record})
    with pytest.raises(ValueError, match="the model's layer is 64 -> 128, the record 64 -> 64"):
        rebuild(model, {"model.layers.0.mlp.up_proj": record})
    with pytest.raises(ValueError, match="unknown kind 'int3'"):
        rebuild(model, {"model.layers.0.self_attn.q_proj": {**record, "kind": "int3"}})
    with pytest.raises(ValueError, match="bad record"):
        rebuild(model, {"model.layers.0.self_attn.q_proj": {**record, "bits": 7}})


@pytest.mark.real_model
@pytest.mark.parametrize("skip", [("lm_head",), ()], ids=["lm_head-dense", "lm_head-4bit"])
def test_smollm2_round_trip(smollm2, skip, tmp_path):
    """SmolLM2 ties its output layer to the embedding; a compressed output layer unties them."""
    model, tokenizer = smollm2
    compressed = fxpress.compress.quantize(model, bits=4, group_size=128, skip=skip).model
    compressed.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert _logits(loaded, ids).equal(_logits(compressed, ids))
    assert loaded.config.tie_word_embeddings == (skip == ("lm_head",))
