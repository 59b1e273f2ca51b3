"""The canonical sparse-bitmask format (compressed-tensors), in pure torch: the reference for the C++ ops and tests.

bitmask[r, k] bit b (little bit order) marks column 8k+b of row r as stored; `compressed` holds the stored values in
row-major order; row_offsets[r] is the number of values in rows before r (exclusive prefix sum).
"""

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_reference(dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rows, cols = dense.shape
    keep = dense != 0
    counts = keep.sum(dim=1)
    padded = torch.nn.functional.pad(keep, (0, (-cols) % 8)).view(rows, (cols + 7) // 8, 8).to(torch.uint8)
    bitmask = (padded * _BIT_WEIGHTS).sum(dim=2, dtype=torch.uint8)
    return dense[keep], bitmask, counts.cumsum(0) - counts


def unpack_reference(compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int) -> Tensor:
    """The dense weight; RuntimeError when the tensors disagree (as the C++ ops raise)."""
    keep = mask_from_bitmask(bitmask, in_features)
    counts = keep.sum(dim=1)
    if int(counts.sum()) != compressed.numel():
        raise RuntimeError(f"the bitmask marks {int(counts.sum())} values, compressed holds {compressed.numel()}")
    if not torch.equal(row_offsets, counts.cumsum(0) - counts):
        raise RuntimeError("row_offsets are not the running sum of the bitmask's row popcounts")
    out = torch.zeros(keep.shape, dtype=compressed.dtype)
    out[keep] = compressed
    return out


def mask_from_bitmask(bitmask: Tensor, in_features: int) -> Tensor:
    bits = (bitmask.unsqueeze(-1) & _BIT_WEIGHTS) != 0
    return bits.view(bitmask.shape[0], bitmask.shape[1] * 8)[:, :in_features]
