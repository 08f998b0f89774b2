"""How far a compressed model's output moves from the dense model's, on the same inputs: the
measure behind every allocation that asks the model rather than each layer (``compress.svd``'s
ranks, ``fxpress.fit``'s sensitivities). A layer's own output error does not say how much its
change matters downstream; this does."""

from __future__ import annotations

from typing import Any

import torch


def model_output(out: Any, who: str) -> tuple[torch.Tensor, bool]:
    """The model's output tensor, and whether it is next-token logits (``who`` names the caller in
    the error when there is none)."""
    if isinstance(out, torch.Tensor):
        return out.detach().float(), False
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits.detach().float(), True
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden.detach().float(), False
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].detach().float(), False
    raise ValueError(f"{who}: cannot measure layer sensitivity: the model returned {type(out).__name__}, which "
                     f"has no tensor, .logits or .last_hidden_state to compare")


def divergence(new: tuple[torch.Tensor, bool], ref: tuple[torch.Tensor, bool]) -> float:
    """KL(dense || compressed) of the next-token distributions, mean over positions, for logits;
    the relative squared error of the output otherwise."""
    (y, logits), (y_ref, _) = new, ref
    if logits:
        p_log = torch.log_softmax(y_ref.reshape(-1, y_ref.shape[-1]), -1)
        q_log = torch.log_softmax(y.reshape(-1, y.shape[-1]), -1)
        return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
    return float((y - y_ref).pow(2).sum() / y_ref.pow(2).sum().clamp_min(1e-30))
