"""Training a compressed model's free numbers to reproduce the dense model (knowledge
distillation): the step SVD-LLM and ASVD follow truncation with when a budget cuts deep, and
EfficientQAT and OmniQuant follow quantisation with.

Truncation and quantisation fit each layer alone, to keep that layer's output on calibration
inputs; the errors of all the layers then compound through the network. Distillation fits them
all at once to what matters, the model's output, on the same calibration batches: next-token
logits (the KL divergence from the dense model's distribution, as ``divergence`` measures it) or,
for encoders, the last hidden state (its squared error relative to the dense one's), padding left
out.

What trains: ``LowRankLinear``'s factors (``down`` and ``up``, biases included) and
``QuantizedLinear``'s scales (``alpha`` and ``beta``, its bit-planes frozen:
``compress.trainable_scales``). Every other parameter stays as it was, and so does the dense
model, which is read, never written. The compressed format does not change.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fxpress.compress.divergence import divergence_of, model_output
from fxpress.compress.linear_layers import set_submodule
from fxpress.compress.low_rank_linear import LowRankLinear
from fxpress.compress.trainable_scales import TrainableScales, trainable as trainable_scales
from fxpress.core.model_inputs import call_with
from fxpress.core.progress import progress


def distill(student: nn.Module, teacher: nn.Module, batches: Sequence[Any], epochs: int, lr: float,
            who: str = "fxpress.compress.svd") -> list[float]:
    """Train ``student``'s factors and quantisation scales for ``epochs`` passes over ``batches``
    (model inputs, as calibration takes them) with Adam at ``lr``, towards ``teacher``'s outputs;
    the mean loss of each epoch. Both models run in eval mode (no dropout); the student's
    ``requires_grad`` flags and training mode are restored afterwards."""
    flags = {p: p.requires_grad for p in student.parameters()}
    modes = (student.training, teacher.training)
    for p in student.parameters():
        p.requires_grad_(False)
    scales = {name: TrainableScales(m) for name, m in student.named_modules() if trainable_scales(m)}
    for name, module in scales.items():
        set_submodule(student, name, module)
    free = [p for m in student.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
    free += [p for m in scales.values() for p in (m.alpha, m.beta)]
    try:
        if not free:
            raise ValueError(f"{who}: distillation found no factored or quantised layer to train")
        for p in free:
            p.requires_grad_(True)
        student.eval()
        teacher.eval()
        optimizer = torch.optim.Adam(free, lr=lr)
        return [_epoch(student, teacher, batches, optimizer, who)
                for _ in progress(range(epochs), "distillation", total=epochs)]
    finally:
        for name, module in scales.items():
            set_submodule(student, name, module.write_back())
        for p, flag in flags.items():
            p.requires_grad_(flag)
        student.train(modes[0])
        teacher.train(modes[1])


def check_distillation(who: str, epochs: Any, lr: Any, calibration: Any) -> None:
    """Refuse distillation options that cannot work, before any other work is done."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"{who}: distill_epochs must be an int >= 0, got {epochs!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < 1:
        raise ValueError(f"{who}: distill_lr must be a learning rate in (0, 1), got {lr!r}")
    if epochs and calibration is None:
        raise ValueError(f"{who}: distill_epochs needs calibration= (the batches it trains on)")


def _padding_mask(batch: Any, out: torch.Tensor) -> torch.Tensor | None:
    """The batch's attention mask when it marks the output's positions: padding is not distilled."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(out.shape[:2]):
        return mask
    return None


@torch.enable_grad()  # callers often hold no_grad (a benchmark, an inference script)
def _epoch(student: nn.Module, teacher: nn.Module, batches: Sequence[Any], optimizer: torch.optim.Optimizer,
           who: str) -> float:
    total = 0.0
    for batch in batches:
        with torch.no_grad():
            target, logits = model_output(call_with(teacher, batch), who)
        out, _ = model_output(call_with(student, batch), who, detach=False)
        loss = divergence_of(out, target, logits, _padding_mask(batch, out))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total / len(batches)
