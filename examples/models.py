"""Model factories for the command line (``fxpress compile examples.models:minilm ...``): each
returns a model in eval mode, loaded from the packages scripts/setup.sh installs."""

from __future__ import annotations

from fxpress import workloads


def minilm():
    """all-MiniLM-L6-v2 (BertModel); its input is ``input_ids``."""
    model, _ = workloads.load_minilm()
    return model


def smollm2():
    """SmolLM2-135M-Instruct (LlamaForCausalLM, fp32)."""
    model, _ = workloads.load_smollm2()
    return model
