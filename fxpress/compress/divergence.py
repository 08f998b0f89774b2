"""How far a compressed model's output moves from the dense model's, on the same inputs: the
measure behind every allocation that asks the model rather than each layer (``compress.svd``'s
ranks, ``fxpress.fit``'s sensitivities). A layer's own output error does not say how much its
change matters downstream; this does."""

from __future__ import annotations

from typing import Any

import torch


def model_output(out: Any, who: str, detach: bool = True) -> tuple[torch.Tensor, bool]:
    """The model's output tensor in float32, and whether it is next-token logits (``who`` names the
    caller in the error when there is none). ``detach=False`` keeps its autograd graph."""
    found = _output_tensor(out)
    if found is None:
        raise ValueError(f"{who}: cannot measure layer sensitivity: the model returned {type(out).__name__}, which "
                         f"has no tensor, .logits or .last_hidden_state to compare")
    tensor, logits = found
    return (tensor.detach() if detach else tensor).float(), logits


def _output_tensor(out: Any) -> tuple[torch.Tensor, bool] | None:
    if isinstance(out, torch.Tensor):
        return out, False
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, True
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden, False
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], False
    return None


def divergence(new: tuple[torch.Tensor, bool], ref: tuple[torch.Tensor, bool]) -> float:
    """KL(dense || compressed) of the next-token distributions, mean over positions, for logits;
    the relative squared error of the output otherwise."""
    (y, logits), (y_ref, _) = new, ref
    return float(divergence_of(y, y_ref, logits))


def divergence_of(y: torch.Tensor, y_ref: torch.Tensor, logits: bool, mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``divergence`` as a tensor (differentiable in ``y``: distillation's loss), over the
    positions where ``mask`` (``[batch, tokens]``, an attention mask; None: all) is nonzero."""
    if logits:
        p_log = torch.log_softmax(y_ref, -1)
        per_position = (p_log.exp() * (p_log - torch.log_softmax(y, -1))).sum(-1)
        if mask is None:
            return per_position.mean()
        weight = mask.to(per_position.dtype)
        return (per_position * weight).sum() / weight.sum().clamp_min(1)
    error, energy = (y - y_ref).pow(2), y_ref.pow(2)
    if mask is not None:
        weight = mask.to(error.dtype).reshape(*mask.shape, *[1] * (error.dim() - mask.dim()))
        error, energy = error * weight, energy * weight
    return error.sum() / energy.sum().clamp_min(1e-30)
