"""nn.Modules over the sparamx ops: drop-in replacements for nn.Linear whose weights stay packed.

Each is built from the canonical (artifact) tensors and prepacks them once into the kernels' layout; the prepacked
buffers are not persistent, since that layout is derived at load time and never stored. int8 weights (per output
channel symmetric, w = weight_scale * q) make the int8 kernels run, with activations quantized per token.
"""

import torch
from torch import Tensor

from . import ops


def _check_scale(values_dtype: torch.dtype, weight_scale: Tensor | None, out_features: int) -> Tensor | None:
    if values_dtype == torch.int8:
        if weight_scale is None or weight_scale.numel() != out_features:
            raise ValueError(f"int8 weights need a weight_scale of {out_features} elements")
        return weight_scale.reshape(-1).float().contiguous()
    if values_dtype != torch.bfloat16:
        raise ValueError(f"packed weights must be bfloat16 or int8, got {values_dtype}")
    if weight_scale is not None:
        raise ValueError("weight_scale is only for int8 weights")
    return None


class _PackedLinear(torch.nn.Module):
    # int8 weights: x quantized per row symmetrically (compressed-tensors' int8 scheme), not with a zero point
    x_symmetric = False

    def _register(self, names, tensors, bias, weight_scale):
        for name, tensor in zip(names, tensors, strict=True):
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("weight_scale", weight_scale, persistent=False)
        self.bias = torch.nn.Parameter(bias.float(), requires_grad=False) if bias is not None else None

    @property
    def int8(self) -> bool:
        return self.weight_scale is not None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weights={'int8' if self.int8 else 'bf16'}{self._density()}"
        )

    def _density(self) -> str:
        return ""

    @classmethod
    def _from_packed(cls, packed, out_features, in_features, bias, weight_scale) -> "_PackedLinear":
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.in_features, module.out_features = in_features, out_features
        module._register(cls._PACKED, packed, bias, weight_scale)
        return module


class SparseLinear(_PackedLinear):
    """y = x @ W^T (+ bias), W in the bitmap format (bf16, or int8 with weight_scale), run by bitmap_linear."""

    _PACKED = ("values", "masks", "block_offsets", "row_sums")

    def __init__(
        self,
        compressed: Tensor,
        bitmask: Tensor,
        row_offsets: Tensor,
        in_features: int,
        bias: Tensor | None = None,
        weight_scale: Tensor | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, bitmask.shape[0]
        self.nnz = compressed.numel()
        scale = _check_scale(compressed.dtype, weight_scale, self.out_features)
        packed = ops.bitmap_prepack(compressed, bitmask, row_offsets, in_features)
        self._register(self._PACKED, packed, bias, scale)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "SparseLinear":
        """bf16 bitmap of a linear's weight (its zeros are the ones dropped)."""
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(*ops.bitmap_pack(linear.weight.detach().to(torch.bfloat16)), linear.in_features, bias)

    def forward(self, x: Tensor) -> Tensor:
        args = (self.out_features, self.in_features, self.weight_scale, self.bias, self.x_symmetric)
        return ops.bitmap_linear(x, self.packed, *args)

    @property
    def packed(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.values, self.masks, self.block_offsets, self.row_sums

    def _density(self) -> str:
        return f", density={self.nnz / max(1, self.in_features * self.out_features):.3f}"


class DenseLinear(_PackedLinear):
    """y = x @ W^T (+ bias), W dense (bf16, or int8 with weight_scale), run by dense_linear."""

    _PACKED = ("values", "row_sums")

    def __init__(self, weight: Tensor, bias: Tensor | None = None, weight_scale: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = _check_scale(weight.dtype, weight_scale, self.out_features)
        self._register(self._PACKED, ops.dense_prepack(weight.contiguous()), bias, scale)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "DenseLinear":
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(linear.weight.detach().to(torch.bfloat16), bias)

    def forward(self, x: Tensor) -> Tensor:
        args = (self.out_features, self.in_features, self.weight_scale, self.bias, self.x_symmetric)
        return ops.dense_linear(x, self.packed, *args)

    @property
    def packed(self) -> tuple[Tensor, Tensor]:
        return self.values, self.row_sums


def fuse_rows(linears: list[_PackedLinear]) -> _PackedLinear | None:
    """One linear computing the outputs of `linears` (same input) one after the other, e.g. q/k/v: their prepacked
    blocks concatenated. Each of `linears` then reads a view of the fused tensors, so no weight is held twice. None
    when they cannot be fused: different kinds, dtypes or inputs, some with a bias and some without, or an output
    count short of whole blocks before the last."""
    first, per_block = linears[0], ops.packed_layout()[0]
    if (
        any(type(lin) is not type(first) or lin.in_features != first.in_features for lin in linears)
        or any(lin.values.dtype != first.values.dtype or (lin.bias is None) != (first.bias is None) for lin in linears)
        or any(lin.x_symmetric != first.x_symmetric for lin in linears)
        or any(lin.out_features % per_block for lin in linears[:-1])
    ):
        return None
    scale = torch.cat([lin.weight_scale for lin in linears]) if first.int8 else None
    bias = torch.cat([lin.bias for lin in linears]) if first.bias is not None else None
    n = sum(lin.out_features for lin in linears)
    fused = type(first)._from_packed(_cat_packed(linears), n, first.in_features, bias, scale)
    fused.x_symmetric = first.x_symmetric
    if isinstance(fused, SparseLinear):
        fused.nnz = sum(lin.nnz for lin in linears)
    rows = blocks = values = 0
    for lin in linears:
        nb = -(-lin.out_features // per_block)
        if first.int8:
            lin.weight_scale = fused.weight_scale[rows : rows + lin.out_features]
        lin.row_sums = fused.row_sums[blocks * per_block : (blocks + nb) * per_block] if first.int8 else lin.row_sums
        if isinstance(lin, SparseLinear):  # values keep their trailing register of slack: the next linear's values
            nnz = int(lin.block_offsets[-1])
            lin.values = fused.values[values : values + lin.values.numel()]
            lin.masks = fused.masks[blocks : blocks + nb]
            values += nnz
        else:
            lin.values = fused.values[blocks : blocks + nb]
        rows, blocks = rows + lin.out_features, blocks + nb
    return fused


def _cat_packed(linears: list[_PackedLinear]) -> tuple[Tensor, ...]:
    row_sums = torch.cat([lin.row_sums for lin in linears])
    if not isinstance(linears[0], SparseLinear):
        return torch.cat([lin.values for lin in linears]), row_sums
    ends = [int(lin.block_offsets[-1]) for lin in linears]
    slack = linears[0].values.new_zeros(linears[0].values.numel() - ends[0])  # the register read past the last values
    values = torch.cat([lin.values[:end] for lin, end in zip(linears, ends, strict=True)] + [slack])
    starts = torch.tensor([0, *ends]).cumsum(0)
    offsets = torch.cat([lin.block_offsets[:-1] + start for lin, start in zip(linears, starts, strict=False)])
    offsets = torch.cat([offsets, starts[-1:]])
    return values, torch.cat([lin.masks for lin in linears]), offsets, row_sums
