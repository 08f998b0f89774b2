"""Graphs that need gradients never lose them: they run eagerly, visibly (a warning, and the reason
in explain()), or are refused with fxpress's own error under ``strict=True``."""

from __future__ import annotations

import copy

import pytest
import torch

import fxpress
from fxpress.core.errors import UnsupportedGraphError
from tests.tiny_models import tiny_bert, token_ids


class Classifier(torch.nn.Module):
    """A compiled backbone under an eager head, as in fine-tuning."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(64, 3)

    def forward(self, ids):
        return self.head(self.backbone(ids).last_hidden_state[:, 0])


def _train(model, steps=5):
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, labels = token_ids(batch=4, length=8), torch.tensor([0, 1, 2, 1])
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids), labels)
        loss.backward()
        optimizer.step()
    return loss.item(), [p.grad for p in model.parameters()]


def test_compiled_backbone_under_an_eager_head_trains_like_eager():
    backbone = tiny_bert()
    eager = Classifier(copy.deepcopy(backbone)).train()
    torch.manual_seed(0)
    compiled = Classifier(copy.deepcopy(backbone)).train()
    compiled.head.load_state_dict(eager.head.state_dict())
    compiled.backbone = torch.compile(compiled.backbone, backend="fxpress")
    expected_loss, expected_grads = _train(eager)
    with pytest.warns(fxpress.FallbackWarning, match="need gradients"):
        loss, grads = _train(compiled)
    assert sum(g is not None for g in grads) > 4  # the backbone's too, not only the head's
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None) and (g is None or torch.allclose(g, e, atol=1e-5))


def test_whole_model_in_train_mode_runs_eagerly_and_the_report_says_why():
    model = tiny_bert().train()
    reports = []
    compiled = torch.compile(model, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append))
    with pytest.warns(fxpress.FallbackWarning, match="need gradients"):
        out = compiled(token_ids(batch=2, length=8)).last_hidden_state
    out.sum().backward()
    assert reports and all("needs gradients" in r.fallback_reason for r in reports)
    assert fxpress.counters["fallbacks"]["graph needs gradients"] == len(reports)
    assert model.embeddings.word_embeddings.weight.grad is not None


def test_strict_raises_fxpress_error():
    model = tiny_bert()
    with pytest.raises(Exception, match="needs gradients") as caught:
        torch.compile(model, backend=fxpress.backend(strict=True))(token_ids())
    chain = [caught.value]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    assert any(isinstance(e, UnsupportedGraphError) for e in chain)


def test_inference_under_no_grad_still_compiles():
    model = tiny_bert()
    reports = []
    with torch.no_grad():
        torch.compile(model, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append))(token_ids())
    assert reports and not any(r.fallback_reason for r in reports)
