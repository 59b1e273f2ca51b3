"""One-line wrappers over the `sparamx` torch ops and their fake (meta) implementations. Which kernel path the linear
ops are asked for is cpu_paths.isa()'s choice."""

import functools

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the TORCH_LIBRARY(sparamx) registrations)
from .cpu_paths import isa


def bitmap_pack(dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense [out, in] -> (compressed values, bitmask uint8 [out, ceil(in/8)], row_offsets int64 [out])."""
    return torch.ops.sparamx.bitmap_pack.default(dense)


def bitmap_unpack(compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int) -> Tensor:
    """Canonical bitmap tensors -> dense [out, in_features] of compressed's dtype."""
    return torch.ops.sparamx.bitmap_unpack.default(compressed, bitmask, row_offsets, in_features)


def bitmap_check(compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int) -> None:
    """Raise RuntimeError unless the tensors form a consistent bitmap (popcounts vs row_offsets vs values)."""
    torch.ops.sparamx.bitmap_check.default(compressed, bitmask, row_offsets, in_features)


def bitmap_prepack(
    compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Canonical bitmap tensors -> (values, masks, block_offsets, row_sums), the kernels' load-time layout."""
    return torch.ops.sparamx.bitmap_prepack.default(compressed, bitmask, row_offsets, in_features)


def dense_prepack(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Dense bf16 or int8 [out, in] -> (blocked values, row_sums), the kernels' load-time layout."""
    return torch.ops.sparamx.dense_prepack.default(weight)


def bitmap_linear(
    x: Tensor,
    packed: tuple[Tensor, Tensor, Tensor, Tensor],
    out_features: int,
    in_features: int,
    weight_scale: Tensor | None = None,
    bias: Tensor | None = None,
    x_symmetric: bool = False,
) -> Tensor:
    """y = x @ W^T (+ bias), W given by bitmap_prepack's tensors (bf16, or int8 with weight_scale, x then quantized
    per row: with a zero point, or symmetric with x_symmetric); y has x's dtype."""
    args = (out_features, in_features, weight_scale, bias, isa(), x_symmetric)
    return torch.ops.sparamx.bitmap_linear.default(x, *packed, *args)


def dense_linear(
    x: Tensor,
    packed: tuple[Tensor, Tensor],
    out_features: int,
    in_features: int,
    weight_scale: Tensor | None = None,
    bias: Tensor | None = None,
    x_symmetric: bool = False,
) -> Tensor:
    """y = x @ W^T (+ bias), W given by dense_prepack's tensors (bf16, or int8 with weight_scale; x_symmetric as
    bitmap_linear's)."""
    args = (out_features, in_features, weight_scale, bias, isa(), x_symmetric)
    return torch.ops.sparamx.dense_linear.default(x, *packed, *args)


def decode_attention(
    q: Tensor,
    k: tuple[Tensor, Tensor, Tensor],
    v: tuple[Tensor, Tensor, Tensor],
    packed: int,
    tail: int,
    valid: Tensor | None,
    scale: float,
) -> Tensor:
    """Attention of one query token per sequence, q [B, Hq, head_dim], over a layer's cache: k and v are each
    (values, masks, tail) as kernels/kv_cache.py keeps them, the first `packed` tokens pruned, then `tail` dense ones;
    valid [B, packed + tail] bool marks the attended tokens (None: all). -> [B, Hq, head_dim] of q's dtype."""
    return torch.ops.sparamx.decode_attention.default(q, *k, *v, packed, tail, valid, scale, isa())


@functools.cache
def kv_tile() -> int:
    """Tokens per packed K tile of the KV cache (csrc/attention_kernels.h), asked of the library: the packer
    (pipeline/kv_sparsity.py) lays K out for the kernel with it."""
    return torch.ops.sparamx.kv_tile.default()


@functools.cache
def packed_layout() -> tuple[int, int, int]:
    """(output rows per block, bf16 columns per chunk, int8 columns per chunk) of the prepacked layout
    (csrc/packed_format.h), asked of the library so the fake kernels below never hold a copy."""
    rows, bf16, int8 = torch.ops.sparamx.packed_layout.default()
    return rows, bf16, int8


def _blocks_and_chunks(rows: int, cols: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(blocks, chunks, chunk width) of a [rows, cols] weight of `dtype` in the prepacked layout."""
    per_block, bf16, int8 = packed_layout()
    chunk = int8 if dtype == torch.int8 else bf16
    return -(-rows // per_block), -(-cols // chunk), chunk


@torch.library.register_fake("sparamx::bitmap_linear")
def _(
    x,
    values,
    masks,
    block_offsets,
    row_sums,
    out_features,
    in_features,
    weight_scale=None,
    bias=None,
    isa="auto",
    x_symmetric=False,
):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("sparamx::dense_linear")
def _(x, values, row_sums, out_features, in_features, weight_scale=None, bias=None, isa="auto", x_symmetric=False):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("sparamx::decode_attention")
def _(q, k_values, k_masks, k_tail, v_values, v_masks, v_tail, packed, tail, valid, scale, isa="auto"):
    return q.new_empty(q.shape)


@torch.library.register_fake("sparamx::decode_layer")
def _(
    hidden,
    cos,
    sin,
    weights,
    shapes,
    heads,
    eps,
    k_values,
    k_masks,
    k_tail,
    v_values,
    v_masks,
    v_tail,
    packed,
    tail,
    valid,
    scale,
    isa="auto",
):
    return torch.empty_like(hidden)


@torch.library.register_fake("sparamx::bitmap_prepack")
def _(compressed, bitmask, row_offsets, in_features):
    per_block = packed_layout()[0]
    blocks, chunks, chunk = _blocks_and_chunks(bitmask.shape[0], in_features, compressed.dtype)
    return (
        compressed.new_empty((compressed.shape[0] + chunk,)),
        bitmask.new_empty((blocks, chunks, per_block * chunk // 8)),
        row_offsets.new_empty((blocks + 1,)),
        row_offsets.new_empty((blocks * per_block if compressed.dtype == torch.int8 else 0,), dtype=torch.int32),
    )


@torch.library.register_fake("sparamx::dense_prepack")
def _(weight):
    per_block = packed_layout()[0]
    blocks, chunks, chunk = _blocks_and_chunks(weight.shape[0], weight.shape[1], weight.dtype)
    return (
        weight.new_empty((blocks, chunks, per_block, chunk)),
        weight.new_empty((blocks * per_block if weight.dtype == torch.int8 else 0,), dtype=torch.int32),
    )


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
