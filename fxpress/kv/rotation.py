"""A randomised Hadamard rotation of attention heads (QuaRot, SpinQuant): keys and queries turned by
the same orthogonal matrix, so every score ``q . k`` is unchanged while the energy of the channels a
few outliers dominate is spread over all of them. Whether a per-channel low-bit grid then fits the
keys better depends on the keys: per-channel scales already absorb channels that are large
throughout, so it is measured (``bench/fidelity.py smollm2_kv``), not assumed.

``R = H_d diag(s) / sqrt(d)``: ``H_d`` the Sylvester Hadamard matrix, ``s`` random signs (a fixed
seed: the same rotation in every process, so a cache's codes mean the same everywhere), ``d`` a power
of two. ``R`` is orthogonal in exact arithmetic: ``(q R)(k R)^T = q R R^T k^T = q k^T``.
"""

from __future__ import annotations

import functools

import torch

SEED = 0x51F7


def is_power_of_two(d: int) -> bool:
    return d > 0 and d & (d - 1) == 0


@functools.lru_cache(maxsize=None)
def _rotation_cpu(d: int) -> torch.Tensor:
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < d:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(SEED), dtype=torch.float64) * 2 - 1
    return hadamard * signs / d ** 0.5


def hadamard_rotation(d: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
                      ) -> torch.Tensor:
    """``R`` [d, d] (rows are input channels): rotate a head ``x`` [..., d] as ``x @ R``. One tensor
    per (d, device, dtype), shared by every layer's store: a constant like a weight, not KV state."""
    if not is_power_of_two(d):
        raise ValueError(f"a Hadamard rotation needs the head dimension to be a power of two, got {d}")
    return _rotation_on(d, torch.device(device), dtype)


@functools.lru_cache(maxsize=None)
def _rotation_on(d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _rotation_cpu(d).to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x @ rotation`` in float32 (at least), returned in ``x``'s dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return (x.to(compute) @ rotation.to(compute)).to(x.dtype)
