"""Training a compressed model's free numbers to reproduce the dense model (knowledge
distillation): the step SVD-LLM and ASVD follow truncation with when a budget cuts deep, and
EfficientQAT and OmniQuant follow quantisation with.

Truncation and quantisation fit each layer alone, to keep that layer's output on calibration
inputs; the errors of all the layers then compound through the network. Distillation fits them
all at once to what matters, the model's output, on the same calibration batches: next-token
logits (the KL divergence from the dense model's distribution, as ``divergence`` measures it) or,
for encoders, the hidden state after every layer when the model can return them (HF's
``output_hidden_states``; else the last one alone): their squared errors relative to the dense
ones', averaged over the layers, padding left out. Matching every layer (as TinyBERT distils) is a
denser signal than the output alone: on MiniLM with its encoder's ranks allocated at half its
linear weights' rank, 10 epochs kept a held-out embedding cosine of 0.922 against 0.874 with the
pooled embedding's cosine as the loss (``bench/results/fidelity-svd-distilled-cpu-2026-12-05.md``).

What trains: ``LowRankLinear``'s factors (``down`` and ``up``, biases included) and
``QuantizedLinear``'s scales (``alpha`` and ``beta``, its bit-planes frozen:
``compress.trainable_scales``). Every other parameter stays as it was, and so does the dense
model, which is read, never written. The compressed format does not change.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Sequence

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
    (model inputs, as calibration takes them; a shuffled order each pass) with Adam from ``lr``
    down a cosine to zero, towards ``teacher``'s outputs; the mean loss of each epoch. Both models
    run in eval mode (no dropout); the student's ``requires_grad`` flags and training mode are
    restored afterwards."""
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
        if not batches:
            raise ValueError(f"{who}: distillation got no batches to train on")
        for p in free:
            p.requires_grad_(True)
        student.eval()
        teacher.eval()
        optimizer = torch.optim.Adam(free, lr=lr)
        steps = epochs * len(batches)
        # The rate decays to zero along a half cosine over all the steps: the last epochs settle
        # instead of hopping (MiniLM: held-out cosine 0.922 after 10 epochs at a constant 3e-4;
        # with the decay over 20, 0.932 after 10 and 0.941 after 20).
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                     lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        # Each epoch takes the batches in a fresh order, as stochastic gradient descent assumes,
        # from a seeded generator so that a run repeats.
        shuffle = torch.Generator().manual_seed(0)
        return [_epoch(student, teacher, [batches[i] for i in torch.randperm(len(batches), generator=shuffle)],
                       optimizer, schedule, who)
                for _ in progress(range(epochs), "distillation", total=epochs)]
    finally:
        for name, module in scales.items():
            set_submodule(student, name, module.write_back())
        for p, flag in flags.items():
            p.requires_grad_(flag)
        student.train(modes[0])
        teacher.train(modes[1])


def check_distillation(who: str, epochs: Any, lr: Any, calibration: Any, distill_batches: Sequence[Any] | None = None,
                       ) -> None:
    """Refuse distillation options that cannot work, before any other work is done
    (``distill_batches`` already a list: the caller materialises it once)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"{who}: distill_epochs must be an int >= 0, got {epochs!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < 1:
        raise ValueError(f"{who}: distill_lr must be a learning rate in (0, 1), got {lr!r}")
    if distill_batches is not None and not epochs:
        raise ValueError(f"{who}: distill_batches= is read only with distill_epochs > 0")
    if distill_batches is not None and not len(distill_batches):
        raise ValueError(f"{who}: distill_batches= got no batches to train on")
    if epochs and calibration is None and distill_batches is None:
        raise ValueError(f"{who}: distill_epochs needs calibration= or distill_batches= (the batches it trains on)")


def _padding_mask(batch: Any, out: torch.Tensor) -> torch.Tensor | None:
    """The batch's attention mask when it marks the output's positions: padding is not distilled."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(out.shape[:2]):
        return mask
    return None


def _with_hidden_states(model: nn.Module, batch: Any) -> Any:
    """``batch`` asking the model for every layer's hidden state too, where its forward takes
    ``output_hidden_states`` and the batch is keyword arguments; else ``batch``."""
    if not isinstance(batch, Mapping) or "output_hidden_states" in batch:
        return batch
    return {**batch, "output_hidden_states": True} if _takes_output_hidden_states(model) else batch


def _takes_output_hidden_states(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``output_hidden_states``: by name, or (transformers 5's
    models, whose forward passes it on through ``**kwargs``) a ``**kwargs`` on a model whose
    config has the option. Another model's ``**kwargs`` may refuse a key it does not know."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return False
    if "output_hidden_states" in parameters:
        return True
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return var_keyword and hasattr(getattr(model, "config", None), "output_hidden_states")


def _compared(model: nn.Module, batch: Any, who: str, detach: bool) -> tuple[list[torch.Tensor], bool]:
    """The outputs distillation compares, and whether they are next-token logits: the logits; else
    every layer's hidden state when the model returned them; else its one output tensor."""
    out = call_with(model, _with_hidden_states(model, batch))
    tensor, logits = model_output(out, who, detach)
    hidden = getattr(out, "hidden_states", None)
    if logits or not isinstance(hidden, (tuple, list)) or not hidden:
        return [tensor], logits
    return [(h.detach() if detach else h).float() for h in hidden], False


@torch.enable_grad()  # callers often hold no_grad (a benchmark, an inference script)
def _epoch(student: nn.Module, teacher: nn.Module, batches: Sequence[Any], optimizer: torch.optim.Optimizer,
           schedule: torch.optim.lr_scheduler.LRScheduler, who: str) -> float:
    total = 0.0
    for batch in batches:
        with torch.no_grad():
            targets, logits = _compared(teacher, batch, who, detach=True)
        outs, _ = _compared(student, batch, who, detach=False)
        if len(outs) != len(targets):
            raise ValueError(f"{who}: the compressed model returned {len(outs)} hidden states where the dense one "
                             f"returned {len(targets)}: distillation compares them layer by layer")
        mask = _padding_mask(batch, outs[-1])
        loss = sum(divergence_of(out, target, logits, mask) for out, target in zip(outs, targets)) / len(outs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += float(loss.detach())
    return total / len(batches)
