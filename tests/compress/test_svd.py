"""fxpress.compress: truncated SVD of Linear layers, its report, and save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxpress.compress import LowRankLinear, load, save, svd
from tests.conftest import max_diff
from tests.tiny_models import tiny_bert, token_ids


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 2)).eval()


def test_rank_ratio_keeps_the_asked_share_of_each_layer():
    result = svd(_mlp(), rank_ratio=0.5)
    (first, second, head) = result.layers
    assert first.rank == second.rank == int(0.5 * 64 * 128 / 192) == 21
    assert head.rank is None and head.skipped == "rank_ratio 0.5 leaves rank 0"
    assert isinstance(result.model[0], LowRankLinear) and type(result.model[3]) is nn.Linear
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
    assert result.params_after < result.params_before
    assert "2 of 3 Linear layers factored" in str(result)


def test_weight_error_is_the_eckart_young_tail_and_the_factors_compute_it():
    torch.manual_seed(1)
    layer = nn.Linear(40, 30)
    x = torch.randn(5, 40)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    for rank in (2, 6, 10):
        result = svd(nn.Sequential(layer), rank=rank)
        assert abs(result.layers[0].weight_error - float(s[rank:].norm() / s.norm())) < 1e-6
        factored = result.model[0]
        approx = factored.up.weight.double() @ factored.down.weight.double()
        with torch.no_grad():
            expected = x.double() @ approx.T + layer.bias.double()
            assert max_diff(factored(x), expected) < 1e-5


def test_activation_aware_factors_cut_the_output_error_on_calibration_data():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 32))
    mix = torch.randn(32, 32) * torch.logspace(0, -3, 32)  # activations with a skewed spectrum
    batches = [torch.randn(64, 32) @ mix for _ in range(4)]
    plain = svd(model, rank=4)
    aware = svd(model, rank=4, calibration=batches)
    x = torch.randn(256, 32) @ mix
    with torch.no_grad():
        err = lambda m: float((m(x) - model(x)).norm() / model(x).norm())
        assert err(aware.model) < 0.5 * err(plain.model)
    assert aware.layers[0].output_error is not None and plain.layers[0].output_error is None


def test_params_kept_is_a_ceiling_on_the_whole_models_parameters():
    model = tiny_bert()
    result = svd(model, params_kept=0.8, targets="encoder.*")
    assert 0.78 < result.kept <= 0.8  # embeddings included; ranks round down
    assert len(set(result.ranks.values())) > 1  # one ratio, so each layer's rank follows its shape
    with pytest.raises(ValueError, match=r"params_kept=0.1 cannot be reached .* they hold \d+\.\d% of"):
        svd(model, params_kept=0.1, targets="encoder.*")


def test_rank_per_pattern_and_targets():
    result = svd(tiny_bert(), rank={"*intermediate*": 8, "*output.dense": 8}, targets="encoder.*")
    factored = set(result.ranks)
    assert factored and all("intermediate" in n or "output.dense" in n for n in factored)
    assert all(r == 8 for r in result.ranks.values())


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of rank=, rank_ratio= and params_kept="),
    ({"rank": 4, "rank_ratio": 0.5}, "exactly one of"),
    ({"rank_ratio": 1.5}, r"rank_ratio must be in \(0, 1\)"),
    ({"rank": -1}, "must be a positive int"),
    ({"rank": 4, "targets": "nothing.*"}, "no nn.Linear layer matches"),
    ({"rank": 4, "calibration": []}, "calibration= gave no batches"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        svd(_mlp(), **kwargs)


def test_low_rank_linear_refuses_a_bad_rank():
    with pytest.raises(ValueError, match="rank must be in 1..16"):
        LowRankLinear(16, 32, 0)


def test_save_and_load_round_trip(tmp_path):
    dense = tiny_bert()
    compressed = svd(dense, rank_ratio=0.4, targets="encoder.*").model
    path = tmp_path / "bert.safetensors"
    save(compressed, path)
    reloaded = load(tiny_bert(), path)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).last_hidden_state, compressed(ids).last_hidden_state)
    assert isinstance(reloaded.encoder.layer[0].intermediate.dense, LowRankLinear)


def test_load_names_what_does_not_fit(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save(svd(_mlp(), rank_ratio=0.5).model, path)
    with pytest.raises(ValueError, match="layer '0' of the checkpoint is not in the model"):
        load(nn.Sequential(), path)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_model
    save_model(_mlp(), str(plain))
    with pytest.raises(ValueError, match="not an fxpress low-rank checkpoint"):
        load(_mlp(), plain)
