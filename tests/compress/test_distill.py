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


def test_distillation_repeats_exactly():
    """The batches' order is shuffled each epoch from distillation's own seeded generator: two
    runs train alike, whatever state torch's global generator is in."""
    dense, calibration = _mlp(), _inputs(4, 1)

    def run(global_seed):
        torch.manual_seed(global_seed)
        return svd(dense, rank=6, calibration=calibration, distill_epochs=3, distill_lr=3e-3)

    first, second = run(1), run(2)
    assert first.distill_losses == second.distill_losses
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 second.model.state_dict().values()))


def test_distillation_options_are_checked_before_any_work():
    with pytest.raises(ValueError, match="needs calibration"):
        svd(_mlp(), rank=6, distill_epochs=2)
    for epochs in (-1, 1.5, True):
        with pytest.raises(ValueError, match="distill_epochs must be"):
            svd(_mlp(), rank=6, calibration=_inputs(1, 1), distill_epochs=epochs)
    with pytest.raises(ValueError, match="distill_lr must be"):
        svd(_mlp(), rank=6, calibration=_inputs(1, 1), distill_epochs=1, distill_lr=0)


def test_distill_batches_train_in_place_of_the_calibration_batches():
    """distill_batches=: whitening uses the calibration batches, distillation the others; the same
    as factoring on the first and distilling on the second by hand."""
    from fxpress.compress.distill import distill

    dense, calibration, corpus = _mlp(), _inputs(2, 1), _inputs(6, 3)
    result = svd(dense, rank=6, calibration=calibration, distill_batches=corpus, distill_epochs=3, distill_lr=3e-3)
    by_hand = svd(dense, rank=6, calibration=calibration)
    losses = distill(by_hand.model, dense, corpus, 3, 3e-3)
    assert result.distill_losses == losses
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                 by_hand.model.state_dict().values()))
    on_calibration = svd(dense, rank=6, calibration=calibration, distill_epochs=3, distill_lr=3e-3)
    assert on_calibration.distill_losses != result.distill_losses
    plain = svd(dense, rank=6, distill_batches=corpus, distill_epochs=2, distill_lr=3e-3)  # no whitening
    assert len(plain.distill_losses) == 2


def test_distill_batches_options_are_checked():
    from fxpress.compress import quantize

    with pytest.raises(ValueError, match="distill_batches= is read only with distill_epochs"):
        svd(_mlp(), rank=6, calibration=_inputs(1, 1), distill_batches=_inputs(1, 2))
    with pytest.raises(ValueError, match="got no batches"):
        svd(_mlp(), rank=6, distill_batches=[], distill_epochs=1)
    with pytest.raises(ValueError, match="distill_batches= is read only with distill_epochs"):
        quantize(_mlp(), bits=4, group_size=32, distill_batches=_inputs(1, 2))
    rtn = quantize(_mlp(), bits=4, group_size=32, distill_batches=_inputs(2, 2), distill_epochs=2)
    assert len(rtn.distill_losses) == 2


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


class _Stack(nn.Module):
    """An encoder as HF shapes one: keyword inputs, ``output_hidden_states`` returning the state
    after every layer alongside the last."""

    def __init__(self, extra_state: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32)) for _ in range(3))
        self.extra_state = extra_state

    def forward(self, x, output_hidden_states=False):
        states = [x]
        for layer in self.layers:
            states.append(states[-1] + layer(states[-1]))
        if self.extra_state:
            states.append(states[-1])
        return type("Out", (), {"last_hidden_state": states[-1],
                                "hidden_states": tuple(states) if output_hidden_states else None})()


def test_an_encoder_is_distilled_layer_by_layer():
    """With a model that returns every layer's hidden state, distillation matches each of them: the
    factored model's intermediate states end closer to the dense ones than when only the last state
    is matched (the batches saying ``output_hidden_states=False``), and than before distillation."""
    from fxpress.compress.distill import _compared

    dense = _Stack().eval()
    inputs = _inputs(8, 1)
    held_out = [{"x": x} for x in _inputs(4, 2)]
    states, logits = _compared(dense, held_out[0], "test", detach=True)
    assert len(states) == 4 and not logits

    def layer_error(model, i):
        with torch.no_grad():
            return sum(_state_error(model, dense, batch, i) for batch in held_out)

    def factored(**options):
        return svd(dense, rank=4, targets="layers.*", distill_lr=3e-3, **options).model

    truncated = factored(calibration=[{"x": x} for x in inputs])
    every_layer = factored(calibration=[{"x": x} for x in inputs], distill_epochs=30)
    last_only = factored(calibration=[{"x": x, "output_hidden_states": False} for x in inputs], distill_epochs=30)
    for i in (1, 2):
        assert layer_error(every_layer, i) < 0.9 * min(layer_error(truncated, i), layer_error(last_only, i))
    assert layer_error(every_layer, 3) < 0.7 * layer_error(truncated, 3)


def _state_error(model, dense, batch, i):
    from fxpress.compress.divergence import divergence_of

    return float(divergence_of(model(**batch, output_hidden_states=True).hidden_states[i],
                               dense(**batch, output_hidden_states=True).hidden_states[i], False))


def test_hidden_states_that_do_not_pair_up_are_refused():
    from fxpress.compress.distill import distill

    dense, student = _Stack().eval(), _Stack(extra_state=True).eval()
    student = svd(student, rank=4, targets="layers.*").model
    with pytest.raises(ValueError, match="returned 5 hidden states where the dense one returned 4"):
        distill(student, dense, [{"x": x} for x in _inputs(1, 1)], epochs=1, lr=1e-3)


def test_a_transformers_encoder_is_asked_for_every_layer():
    """transformers 5's BertModel takes ``output_hidden_states`` through ``**kwargs``, not by name:
    distillation still compares the state after every layer (embeddings included), not the last alone."""
    from fxpress.compress.distill import _compared

    from tests.tiny_models import tiny_bert, token_ids

    bert = tiny_bert()
    states, logits = _compared(bert, {"input_ids": token_ids()}, "test", detach=True)
    assert len(states) == bert.config.num_hidden_layers + 1 and not logits


def test_kwargs_without_the_option_are_not_sent_it():
    """A forward with ``**kwargs`` but no config saying it knows ``output_hidden_states`` is called
    as the batch is: an unknown key could be refused, or passed somewhere it breaks."""
    from fxpress.compress.distill import _compared

    class Strict(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x, **kwargs):
            if kwargs:
                raise TypeError(f"unexpected {sorted(kwargs)}")
            return self.linear(x)

    states, _ = _compared(Strict(), {"x": torch.randn(2, 8)}, "test", detach=True)
    assert len(states) == 1
