"""Pruning math: scores and masks as pure functions of tensors (no model, no hooks, no device choices).

A mask is a bool tensor shaped like the weight, True where the weight is kept.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .obs_sweep import column_sweep


def magnitude_scores(weight: Tensor) -> Tensor:
    return weight.abs().float()


def wanda_scores(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, arXiv:2306.11695). input_sq_norm[j] is the sum of x_j^2 over calibration tokens."""
    if input_sq_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_sq_norm must have shape ({weight.shape[1]},), got {tuple(input_sq_norm.shape)}")
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


@dataclass(frozen=True)
class PruningMethod:
    """A way to score weights: `scores(weight, input_sq_norm)`; calibrated methods get the per-column sums of x_j^2
    over the calibration tokens, the others None."""

    calibrated: bool
    scores: Callable[[Tensor, Tensor | None], Tensor]


# prune.method -> its scoring; the recipe accepts exactly these names.
PRUNING_METHODS = {
    "magnitude": PruningMethod(calibrated=False, scores=lambda weight, input_sq_norm: magnitude_scores(weight)),
    "wanda": PruningMethod(calibrated=True, scores=wanda_scores),
}


def unstructured_mask(scores: Tensor, sparsity: float, group: str = "row") -> Tensor:
    """Zero the lowest-scoring `sparsity` fraction, per output row (group="row") or over the whole matrix ("layer").

    The count is floor(n * sparsity) exactly, ties broken by position, so a 50% row of 576 keeps exactly 288.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if group == "row":
        return _drop_lowest_per_row(scores, int(scores.shape[1] * sparsity))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if group == "layer":
        k = int(scores.numel() * sparsity)
        if k:
            mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    else:
        raise ValueError(f"group must be 'row' or 'layer', got {group!r}")
    return mask


def _drop_lowest_per_row(scores: Tensor, k: int) -> Tensor:
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return mask


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the n highest scores of every m consecutive inputs in each row (n:m semi-structured sparsity).

    A trailing group shorter than m (in_features not a multiple of m) keeps min(n, its length) weights.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    rows, cols = scores.shape
    pad = (-cols) % m
    # Padding scores of -inf are always among the dropped, so a short tail group keeps its own n best.
    padded = torch.nn.functional.pad(scores.float(), (0, pad), value=float("-inf")).view(rows, -1, m)
    keep = torch.zeros_like(padded, dtype=torch.bool)
    keep.scatter_(2, torch.topk(padded, n, dim=2).indices, True)
    return keep.view(rows, -1)[:, :cols]


def prune_mask(scores: Tensor, sparsity: float, nm: tuple[int, int] | None, group: str = "row") -> Tensor:
    """The mask a PruneConfig asks for: N:M when nm is given, else unstructured at `sparsity`."""
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, group)


def apply_mask_(weight: Tensor, mask: Tensor) -> Tensor:
    """Zero the weights where mask is False, in place."""
    weight.masked_fill_(~mask, 0)
    return weight


def refit_kept_weights(weight: Tensor, mask: Tensor, gram: Tensor, damp: float = 0.01, block: int = 128) -> Tensor:
    """Zero the weights outside `mask` and compensate on the kept ones, so the layer's outputs on the calibration
    inputs X (gram = X^T X) move as little as possible: SparseGPT's column sweep (arXiv:2301.00774, Algorithm 1)
    with the mask given instead of chosen. Column by column, each pruned weight's error is spread over the row's
    later columns through the Cholesky factor of H^-1, H = gram + damp * mean(diag(gram)) * I; O(K^3 + N K^2),
    all rows at once. Returns a new fp32 tensor, zero exactly where mask is False.
    """
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    return column_sweep(weight, gram, damp, block, lambda w1, i1, i2: mask[:, i1:i2])


def wanda_sweep(
    weight: Tensor,
    gram: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    block: int = 128,
) -> Tensor:
    """Wanda's mask chosen block by block during the refit sweep, from the weights as refit so far (SparseGPT's
    adaptive mask selection, with Wanda's |W_ij| * ||X_j||_2 in place of the OBS saliency): each `block` columns keep
    the best of every row, so later columns are judged after earlier pruning moved weight onto them. Every row drops
    exactly floor(in_features * sparsity) (N:M: n of every m, `block` a multiple of m). Returns a new fp32 tensor.
    """
    if nm and block % nm[1]:
        raise ValueError(f"block {block} must be a multiple of M={nm[1]} for N:M")
    input_sq_norm = gram.diagonal()  # sum of x_j^2 over the calibration tokens

    def choose(w1: Tensor, i1: int, i2: int) -> Tensor:
        scores = wanda_scores(w1, input_sq_norm[i1:i2])
        if nm:
            return nm_mask(scores, *nm)
        # per block, summing to floor(in_features * sparsity) over the row
        return _drop_lowest_per_row(scores, int(i2 * sparsity) - int(i1 * sparsity))

    return column_sweep(weight, gram, damp, block, choose)
