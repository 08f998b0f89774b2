"""fxpress vs eager on tiny random BERT, Llama (GQA) and GPT-2, including StaticCache decoding."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import StaticCache

import fxpress
from fxpress.hf.cache_argument import cache_argument
from tests.conftest import max_diff
from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_llama, token_ids

TOL = 1e-5


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama, tiny_gpt2], ids=["bert", "llama_gqa", "gpt2"])
def test_forward_matches_eager(make):
    model, ids = make(), token_ids()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second row
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)[0]
        actual = torch.compile(model, backend="fxpress")(ids, attention_mask=mask)[0]
    assert max_diff(actual, expected) <= TOL


def test_static_cache_decode_updates_cache_in_place():
    model, ids = tiny_llama(), token_ids(batch=2, length=6)
    compiled = torch.compile(model, backend="fxpress")
    ours = StaticCache(config=model.config, max_cache_len=16)
    theirs = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        a, b = compiled(ids, **cache_argument(ours)).logits, model(ids, **cache_argument(theirs)).logits
        assert max_diff(a, b) <= TOL
        for _ in range(4):
            step = b[:, -1:].argmax(-1)
            a = compiled(step, **cache_argument(ours)).logits
            b = model(step, **cache_argument(theirs)).logits
            assert max_diff(a, b) <= TOL
    for mine, ref in zip(ours.layers, theirs.layers):
        assert max_diff(mine.keys, ref.keys) <= TOL and max_diff(mine.values, ref.values) <= TOL


def test_decode_graph_writes_cache_rows_in_place():
    model, ids = tiny_llama(layers=1), token_ids(batch=1, length=4)
    reports = []
    compiled = torch.compile(model, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        compiled(ids, **cache_argument(cache))
        compiled(ids[:, :1], **cache_argument(cache))
    decode = reports[-1]
    assert decode.ops_after.get("aten.index_copy_.default") == 2
    assert "aten.index_copy.default" not in decode.ops_after


def test_entry_point_finds_backend_without_import():
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: torch.relu(x) * 2, backend='fxpress')\n"
        "x = torch.randn(5)\n"
        "assert torch.equal(f(x), torch.relu(x) * 2)\n"
        "print('fxpress' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # loaded by torch through the entry point


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama_gqa"])
def test_dynamic_sequence_length_compiles_once(make):
    reports = []
    backend = fxpress.Backend(fxpress.Options(check=True), on_report=reports.append)
    model = make()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for length in (7, 13, 21):
            ids = token_ids(batch=2, length=length)
            assert max_diff(compiled(ids)[0], model(ids)[0]) <= TOL
    assert len(reports) == 1 and reports[0].fallback_reason is None


class _BrokenBlock(torch.nn.Module):
    """A graph break inside a repeated block: Dynamo resumes every instance into one graph and
    passes each instance's weights as its inputs."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        x = torch.relu(self.first(x))
        torch._dynamo.graph_break()
        return self.second(x) + x


def test_a_graph_shared_by_several_modules_runs_each_ones_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_BrokenBlock(), _BrokenBlock(), _BrokenBlock()).eval()
    x = torch.randn(2, 8)
    reports = []
    compiled = torch.compile(model, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append))
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max() <= 1e-6
        first_call = len(reports)
        assert (compiled(x + 1) - model(x + 1)).abs().max() <= 1e-6
    # Each block's weights got their own program on the first call; the second call compiled nothing.
    assert first_call >= 3 and len(reports) == first_call
