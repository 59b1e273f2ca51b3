"""The Optimal Brain Surgeon column sweep that SparseGPT's refit (arXiv:2301.00774) and GPTQ (arXiv:2210.17323)
share: columns are fixed left to right, and each column's error (the weight minus what it becomes: 0 where pruned,
its int8 grid value where quantized) is spread over the row's later columns through the upper Cholesky factor of
H^-1, H = X^T X + damp * mean(diag(X^T X)) * I, so the layer's outputs on the calibration inputs move as little as
possible. Pure functions of tensors; all rows at once; fp32 throughout, as both papers' code.
"""

from collections.abc import Callable

import torch
from torch import Tensor

# choose(w_block, i1, i2) -> keep mask of the block's columns, given them as updated so far
Choose = Callable[[Tensor, int, int], Tensor]
# target(column, i) -> the value each kept weight of column i takes (the identity for pruning alone)
Target = Callable[[Tensor, int], Tensor]


def inverse_hessian_factor(gram: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (gram + damp * mean(diag) * I)^-1: row i holds the update of columns i.. when column
    i is fixed. Inputs that never fire get a unit diagonal (no compensation through them, H stays invertible)."""
    h = gram.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    h = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h, upper=True)


def column_sweep(weight: Tensor, gram: Tensor, damp: float, block: int, choose: Choose, target: Target | None = None):
    """Sweep `weight` [out, in] against `gram` [in, in]; returns a new fp32 tensor, exactly 0 where `choose` dropped a
    weight and exactly target(...) where it kept one."""
    out_features, in_features = weight.shape
    if gram.shape != (in_features, in_features):
        raise ValueError(f"gram must have shape ({in_features}, {in_features}), got {tuple(gram.shape)}")
    hinv = inverse_hessian_factor(gram, damp)
    w = weight.float().clone()
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1, hinv1 = w[:, i1:i2], hinv[i1:i2, i1:i2]
        keep1 = choose(w1, i1, i2)
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            column = w1[:, i]
            fixed = torch.where(keep1[:, i], column if target is None else target(column, i1 + i), 0.0)
            err = (column - fixed) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = fixed  # exact zeros and grid values where the update left rounding residue
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w
