"""Small models for the artifact and command-line tests (importable as ``module:factory``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)) * 2 + 1).softmax(-1)


def mlp() -> MLP:
    return MLP().eval()


def mlp_with_inputs() -> tuple[MLP, tuple[torch.Tensor]]:
    return MLP().eval(), (torch.randn(3, 16),)


# The decode step and the greedy loop are the example's own (examples/aot_artifact.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from aot_artifact import decode_step, greedy  # noqa: E402


def tiny_llama_step() -> tuple[torch.nn.Module, tuple, dict[str, torch.Tensor]]:
    """A tiny Llama's one-token decode step with its StaticCache as buffers, and example inputs."""
    from tests.tiny_models import tiny_llama

    return decode_step(tiny_llama()), (), {"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([0])}
