"""Compressed models through transformers' own ``save_pretrained`` / ``from_pretrained``.

    result = fxpress.compress.quantize(model, bits=4)          # or svd, load_gguf, or both
    result.model.save_pretrained("smollm2-4bit")               # config.json + model.safetensors
    import fxpress.hf.quantizer                                # registers quant_method "fxpress"
    model = AutoModelForCausalLM.from_pretrained("smollm2-4bit")   # the same QuantizedLinear layers

Compression records each compressed layer in ``config.quantization_config``
(``fxpress.compress.layer_records``). Importing this module registers that config and a quantizer
with transformers (``register_quantization_config`` / ``register_quantizer``); on load the
quantizer turns the named Linear layers of the empty model into empty compressed layers, and
transformers fills them from the safetensors file like any other weights. Nothing is quantised
on load: a checkpoint must already be compressed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from fxpress.compress.layer_records import METHOD, rebuild


@register_quantization_config(METHOD)
class FxpressConfig(QuantizationConfigMixin):
    """``layers``: ``{layer name: record}`` as ``fxpress.compress.layer_records.describe`` writes."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        self.quant_method = METHOD
        self.layers = dict(layers or {})


@register_quantizer(METHOD)
class FxpressQuantizer(HfQuantizer):
    requires_calibration = True  # loads compressed checkpoints; compression is fxpress.compress's job

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        pass

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        return False

    def _process_model_before_weight_loading(self, model: Any, dtype: torch.dtype | None = None,
                                             **kwargs: Any) -> None:
        rebuild(model, self.quantization_config.layers, dtype or torch.float32)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
