"""compress.svd(distill_epochs=...): the factors, and only they, train towards the dense model's
output, which moves the factored model closer to it on inputs it was not trained on."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxpress.compress import svd
from fxpress.compress.divergence import divergence, model_output


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 32)).eval()


def _inputs(batches, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 32, generator=g) for _ in range(batches)]


def _error(model, dense, inputs):
    with torch.no_grad():
        return sum(divergence(model_output(model(x), "test"), model_output(dense(x), "test")) for x in inputs)


def test_distillation_brings_the_factored_model_closer_to_the_dense_one_on_held_out_inputs():
    dense = _mlp()
    before = copy.deepcopy(dense.state_dict())
    calibration, held_out = _inputs(8, 1), _inputs(4, 2)
    truncated = svd(dense, rank=6, calibration=calibration)
    distilled = svd(dense, rank=6, calibration=calibration, distill_epochs=30, distill_lr=3e-3)
    assert distilled.ranks == truncated.ranks and distilled.params_after == truncated.params_after
    assert len(distilled.distill_losses) == 30 and distilled.distill_losses[-1] < distilled.distill_losses[0]
    assert _error(distilled.model, dense, held_out) < 0.7 * _error(truncated.model, dense, held_out)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # the teacher is only read
    assert all(p.requires_grad for p in distilled.model.parameters())  # flags as deepcopy left them
    assert "distilled for 30 epochs" in str(distilled)


def test_distillation_options_are_checked_before_any_work():
    with pytest.raises(ValueError, match="needs calibration"):
        svd(_mlp(), rank=6, distill_epochs=2)
    for epochs in (-1, 1.5, True):
        with pytest.raises(ValueError, match="distill_epochs must be"):
            svd(_mlp(), rank=6, calibration=_inputs(1, 1), distill_epochs=epochs)
    with pytest.raises(ValueError, match="distill_lr must be"):
        svd(_mlp(), rank=6, calibration=_inputs(1, 1), distill_epochs=1, distill_lr=0)


@pytest.mark.parametrize("logits", [True, False])
def test_padded_positions_do_not_count(logits):
    """What distillation minimises ignores the positions an attention mask pads, for logits (KL)
    and hidden states (relative squared error) alike."""
    from fxpress.compress.divergence import divergence_of

    g = torch.Generator().manual_seed(0)
    y, y_ref = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    moved = y.clone()
    moved[0, 3:] = 10 * torch.randn(2, 7, generator=g)  # only padded positions change
    assert torch.allclose(divergence_of(moved, y_ref, logits, mask), divergence_of(y, y_ref, logits, mask))
    assert not torch.allclose(divergence_of(moved, y_ref, logits), divergence_of(y, y_ref, logits))
    unpadded = divergence_of(y[1:], y_ref[1:], logits)
    assert torch.allclose(divergence_of(y[1:], y_ref[1:], logits, mask[1:]), unpadded)


def test_distilled_quantisation_scales_keep_the_codes_and_the_format():
    """compress.quantize(distill_epochs=...): only the scales train; the bit-planes, the scale dtype
    and the layer type stay; the output on held-out inputs moves towards the dense model's."""
    from fxpress.compress import quantize
    from fxpress.compress.quantized_linear import QuantizedLinear

    dense = _mlp()
    calibration, held_out = _inputs(8, 1), _inputs(4, 2)
    plain = quantize(dense, bits=2, group_size=32, method="bcq", calibration=calibration)
    tuned = quantize(dense, bits=2, group_size=32, method="bcq", calibration=calibration, distill_epochs=30,
                     distill_lr=1e-3)
    for name in plain.layers:
        before, after = plain.model.get_submodule(name), tuned.model.get_submodule(name)
        assert type(after) is QuantizedLinear and after.alpha.dtype == torch.float16
        assert torch.equal(before.planes, after.planes) and not torch.equal(before.alpha, after.alpha)
    assert tuned.distill_losses[-1] < tuned.distill_losses[0]
    assert _error(tuned.model, dense, held_out) < 0.8 * _error(plain.model, dense, held_out)
    assert "distilled for 30 epochs" in str(tuned)
    assert tuned.weight_bytes == plain.weight_bytes
