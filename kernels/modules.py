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


class SparseLinear(_PackedLinear):
    """y = x @ W^T (+ bias), W in the bitmap format (bf16, or int8 with weight_scale), run by bitmap_linear."""

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
        self._register(("values", "masks", "block_offsets", "row_sums"), packed, bias, scale)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "SparseLinear":
        """bf16 bitmap of a linear's weight (its zeros are the ones dropped)."""
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(*ops.bitmap_pack(linear.weight.detach().to(torch.bfloat16)), linear.in_features, bias)

    def forward(self, x: Tensor) -> Tensor:
        return ops.bitmap_linear(x, self.packed, self.out_features, self.in_features, self.weight_scale, self.bias)

    @property
    def packed(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.values, self.masks, self.block_offsets, self.row_sums

    def _density(self) -> str:
        return f", density={self.nnz / max(1, self.in_features * self.out_features):.3f}"


class DenseLinear(_PackedLinear):
    """y = x @ W^T (+ bias), W dense (bf16, or int8 with weight_scale), run by dense_linear."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, weight_scale: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = _check_scale(weight.dtype, weight_scale, self.out_features)
        self._register(("values", "row_sums"), ops.dense_prepack(weight.contiguous()), bias, scale)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "DenseLinear":
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(linear.weight.detach().to(torch.bfloat16), bias)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dense_linear(x, self.packed, self.out_features, self.in_features, self.weight_scale, self.bias)

    @property
    def packed(self) -> tuple[Tensor, Tensor]:
        return self.values, self.row_sums
