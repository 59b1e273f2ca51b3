"""One-line wrappers over the `sparamx` torch ops, and their fake (meta) implementations for tracing."""

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the TORCH_LIBRARY(sparamx) registrations)


def bitmap_pack(dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense [out, in] -> (compressed values, bitmask uint8 [out, ceil(in/8)], row_offsets int64 [out])."""
    return torch.ops.sparamx.bitmap_pack.default(dense)


def bitmap_unpack(compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int) -> Tensor:
    """Canonical bitmap tensors -> dense [out, in_features] of compressed's dtype."""
    return torch.ops.sparamx.bitmap_unpack.default(compressed, bitmask, row_offsets, in_features)


@torch.library.register_fake("sparamx::bitmap_pack")
def _(dense):
    rows, cols = dense.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (
        dense.new_empty(nnz),
        dense.new_empty((rows, (cols + 7) // 8), dtype=torch.uint8),
        dense.new_empty((rows,), dtype=torch.int64),
    )


@torch.library.register_fake("sparamx::bitmap_unpack")
def _(compressed, bitmask, row_offsets, in_features):
    return compressed.new_empty((bitmask.shape[0], in_features))
