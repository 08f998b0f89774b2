"""fxpress.fit: the fitted model fits and compiles, and a budget nothing fits is refused with the reason."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.core.errors import OptionError
from fxpress.hf.fit import kv_bytes
from tests.tiny_models import tiny_llama, token_ids

POLICIES = [fxpress.FullKV(), fxpress.KIVI(bits=4, group_size=16, residual=16),
            fxpress.KIVI(bits=2, group_size=16, residual=16)]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    full = 2 * sum(p.numel() for p in model.parameters()) + kv_bytes(model, fxpress.FullKV(), 256)
    return model, [token_ids(1, 64, seed=s) for s in range(4)], full


def test_the_fitted_model_fits_its_budget_and_compiles(tiny):
    model, calibration, full = tiny
    result = fxpress.fit(model, 0.6 * full, calibration, 256, group_size=32, kv_policies=POLICIES)
    assert result.total_bytes <= 0.6 * full
    kinds = {o.kind for o in result.plan.values()}
    assert kinds - {"dense"}, "a 60 % budget needs some layer compressed"
    text = str(result)
    assert "model.layers.1.mlp.down_proj" in text and "KV policies tried:" in text
    tried = {c["policy"]: c for c in result.candidates}
    assert result.kv.describe() in tried and "perplexity" in tried[result.kv.describe()]
    assert result.calibration_perplexity == min(c["perplexity"] for c in result.candidates if "perplexity" in c)
    ids = token_ids(2, 12)
    with torch.no_grad():
        eager = result.model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(result.model, backend="fxpress")(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_a_larger_budget_never_measures_worse_on_the_layers(tiny):
    model, calibration, full = tiny
    errors = []
    for fraction in (0.45, 0.6, 0.8):
        result = fxpress.fit(model, fraction * full, calibration, 256, group_size=32, kv_policies=POLICIES[1:2])
        errors.append(sum(o.error for o in result.plan.values()))
    assert errors == sorted(errors, reverse=True)


def test_a_budget_nothing_fits_is_refused_with_what_was_tried(tiny):
    model, calibration, full = tiny
    with pytest.raises(OptionError, match=r"fits no plan: the smallest weights it can make take \d+ bytes.*full:"):
        fxpress.fit(model, 0.2 * full, calibration, 256, group_size=32, kv_policies=POLICIES)


def test_a_tight_budget_stores_the_tied_embedding_at_low_bit_once(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxpress.hf.quantizer  # noqa: F401  (from_pretrained rebuilds fxpress's layers)

    from fxpress.compress.quantized_embedding import QuantizedEmbedding, TiedQuantizedHead

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM._from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    full = 2 * sum(p.numel() for p in model.parameters()) + kv_bytes(model, fxpress.FullKV(), 256)
    calibration = [torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    result = fxpress.fit(model, 0.3 * full, calibration, 256, group_size=32, kv_policies=POLICIES)
    assert result.total_bytes <= 0.3 * full
    assert result.plan["model.embed_tokens"].kind == "bits", "the table is half the weights: 30 % needs it compressed"
    embedding, head = result.model.model.embed_tokens, result.model.lm_head
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(head, TiedQuantizedHead)
    assert head.embedding is embedding
    assert "model.embed_tokens" in str(result)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        eager = result.model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(result.model, backend="fxpress")(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    result.model.save_pretrained(tmp_path)  # the table once, under the embedding's name
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.lm_head, TiedQuantizedHead) and reloaded.lm_head.embedding is reloaded.model.embed_tokens
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits, eager)


def test_options_weigh_the_model_divergence_their_layer_causes(tiny):
    from fxpress.compress.divergence import divergence, model_output
    from fxpress.compress.linear_layers import set_submodule
    from fxpress.hf.fit import measure

    model, calibration, _ = tiny
    measured = measure(model, calibration, 256, group_size=32)
    unweighed = measure(model, calibration, 256, group_size=32, sensitivity_batches=0)
    assert not unweighed.sensitivity
    assert all(o.error == o.output_error for opts in unweighed.options.values() for o in opts)
    assert set(measured.sensitivity) == set(measured.options)
    name = "model.layers.1.mlp.down_proj"
    probe = next(o for o in measured.options[name] if o.kind == "bits" and o.value == 3)
    with torch.no_grad():  # the probe's divergence, measured here by hand
        work = measured.model
        dense = model_output(work(calibration[0]), "test")
        kept = work.get_submodule(name)
        set_submodule(work, name, measured.made[(name, "bits", 3)])
        by_hand = divergence(model_output(work(calibration[0]), "test"), dense)
        set_submodule(work, name, kept)
    assert measured.sensitivity[name] == pytest.approx(by_hand, rel=1e-6)
    assert probe.error == pytest.approx(by_hand, rel=1e-6)
    for option in measured.options[name]:  # every option scaled by the same divergence per output error
        assert option.error == pytest.approx(option.output_error * by_hand / probe.output_error, rel=1e-9)
    layers = {n for n in measured.options if "layers" in n}
    assert len({round(measured.sensitivity[n] / next(o for o in measured.options[n] if o.value == 3).output_error, 12)
                for n in layers}) > 1, "layers differ in what their output error costs the model"


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_sensitivity_batches_must_be_a_count(tiny, bad):
    from fxpress.hf.fit import measure

    model, calibration, _ = tiny
    with pytest.raises(OptionError, match="sensitivity_batches must be an int >= 0"):
        measure(model, calibration, 256, group_size=32, sensitivity_batches=bad)
