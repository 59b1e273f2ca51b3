"""nn.Modules over the sparamx ops: drop-in replacements for nn.Linear whose weights stay packed."""

import torch
from torch import Tensor

from . import ops


class SparseLinear(torch.nn.Module):
    """y = x @ W^T (+ bias) with W held in the canonical bitmap format (bf16 values) and run by bitmap_linear."""

    def __init__(
        self, compressed: Tensor, bitmask: Tensor, row_offsets: Tensor, in_features: int, bias: Tensor | None = None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, bitmask.shape[0]
        self.register_buffer("compressed", compressed.to(torch.bfloat16).contiguous())
        self.register_buffer("bitmask", bitmask.contiguous())
        self.register_buffer("row_offsets", row_offsets.contiguous())
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "SparseLinear":
        weight = linear.weight.detach().to(torch.bfloat16)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(*ops.bitmap_pack(weight), linear.in_features, bias)

    def forward(self, x: Tensor) -> Tensor:
        return ops.bitmap_linear(x, self.compressed, self.bitmask, self.row_offsets, self.in_features, self.bias)

    def extra_repr(self) -> str:
        density = self.compressed.numel() / max(1, self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"
