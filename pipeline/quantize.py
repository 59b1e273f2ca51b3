"""INT8 weight quantization math: pure functions of tensors (no model, no recipe).

Weights: per output channel, symmetric, scale = absmax / 127, so the largest weight of each row maps to +-127 and no
weight is ever clipped (the clamp below only guards the rounding of exactly +-127.5 away). A weight smaller than half
a step rounds to 0 -- that is quantization, not pruning: the artifact keeps the pruning mask, not the rounded zeros.
Activations are quantized by the kernels at run time, per token (kernels/csrc/linear.cpp).
Two ways to round: to nearest (`quantize_per_channel`), or GPTQ (`gptq_per_channel`), which fixes the columns one at a
time and moves each one's rounding error onto the columns not yet rounded, against the calibration inputs' X^T X.
"""

import math

import torch
from torch import Tensor

from .obs_sweep import column_sweep

_ROWS_PER_BLOCK = 4096


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [out, in] -> (q int8 [out, in], scale float32 [out]) with weight ~= scale[:, None] * q.

    A row of zeros gets scale 1 (any scale reproduces it; 1 keeps the scale finite and positive).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    # Row blocks bound the fp32 temporaries (a Llama-3 lm_head in fp32 would be 2 GiB); rows are independent.
    for start in range(0, weight.shape[0], _ROWS_PER_BLOCK):
        w = weight[start : start + _ROWS_PER_BLOCK].float()
        s = _channel_scales(w)
        q[start : start + len(w)] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start : start + len(w)] = s
    return q, scale


def _channel_scales(w: Tensor) -> Tensor:
    """absmax / 127 per row of fp32 `w`; 1 for a row of zeros."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight holds inf or nan; it cannot be quantized")
    s = w.abs().amax(dim=1) / 127.0
    return torch.where(s > 0, s, torch.ones_like(s))


def gptq_per_channel(weight: Tensor, gram: Tensor, damp: float = 0.01, block: int = 128) -> tuple[Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323) on the per-channel symmetric grid of `quantize_per_channel`: the
    same scales (absmax / 127 of each row), the same output format, but the values chosen so that X W^T moves as
    little as possible on the calibration inputs (gram = X^T X). Zeros stay zeros (the pruning mask is kept)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.float()
    scale = _channel_scales(w)
    keep = w != 0

    def on_grid(column: Tensor, i: int) -> Tensor:
        return torch.round(column / scale).clamp_(-127, 127) * scale

    swept = column_sweep(w, gram, damp, block, lambda w1, i1, i2: keep[:, i1:i2], on_grid)
    return torch.round(swept / scale[:, None]).to(torch.int8), scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """The float32 weight an int8 (q, per-row scale) pair stands for."""
    return q.float() * scale.reshape(-1, 1).float()


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum ref^2 / sum (ref - approx)^2), in dB."""
    ref = reference.double()
    noise = (ref - approximation.double()).square().sum().item()
    signal = ref.square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel factors (Xiao et al. 2023, arXiv:2211.10438):
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), the max over every weight that reads X. Dividing X by s and
    multiplying W's columns by s leaves X W^T unchanged but moves activation outliers into the weights, which
    per-channel int8 handles better than per-token activations. Channels never active get s = 1.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    w_absmax = torch.stack([w.abs().float().amax(dim=0) for w in weights]).amax(dim=0)
    act = act_absmax.float()
    scales = act.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((act > 0) & (w_absmax > 0), scales, torch.ones_like(scales))
