"""The SVD that ``compress.svd`` truncates: of ``W`` itself, or activation-aware (SVD-LLM).

With calibration inputs' Gram ``G = X^T X = L L^T``, ``||X (W - W')^T||_F = ||(W - W') L||_F``:
truncating ``W L = U S V^T`` and mapping back with ``L^-1`` gives the rank-``r`` ``W'`` with the
least output error on those inputs. Either way ``W' = U[:, :r] S[:r] rows[:r]``.
"""

from __future__ import annotations

import torch


def singular_triplets(w: torch.Tensor, gram: torch.Tensor | None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(U, S, rows, L)`` of float64 ``w`` (``L``: the Gram's Cholesky factor, None without one)."""
    if gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u, s, vh, None
    chol = cholesky(gram.to(w.device))
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    return u, s, torch.linalg.solve_triangular(chol, vh, upper=False, left=False), chol  # vh L^-1


def cholesky(gram: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of the Gram matrix, damped until it is positive definite."""
    damp = 1e-6 * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + damp * eye)
        if int(info) == 0:
            return chol
        damp *= 10
    raise ValueError("fxpress.compress.svd: calibration activations are degenerate (Gram matrix not "
                     "positive definite even after damping); give more or more varied calibration data")
