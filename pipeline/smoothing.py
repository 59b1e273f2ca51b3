"""SmoothQuant's lifecycle: per-channel activation maxima from calibration windows, block by block, folded into the
weights so the int8 kernels see tamer activations. The math is quantize.smoothing_scales; this file only walks the
model. Exact in real arithmetic: the block computes the same function before and after.

Per Llama-family block, three foldable pairs (the op before the linears absorbs 1/s, the linears' columns take s):
input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up_proj rows -> down_proj (down reads act(gate) * up).
o_proj is left alone: with grouped-query attention its input channels share v_proj rows.
With `head` (an int8 lm_head), a fourth: the final norm -> lm_head, on lm_head's own (untied) weight.
"""

import torch

from .errors import ModelError
from .layerwise import BlockWalk, block_output
from .quantize import smoothing_scales

# (module that absorbs 1/s, how: "norm" scales its weight, "rows" scales a linear's output rows), linears reading it
FOLDS = (
    ("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", "rows", ("mlp.down_proj",)),
)


class InputAbsMax:
    """Forward pre-hook state: max over calibration tokens of |x_j|, per input column of one linear."""

    def __init__(self):
        self.absmax = None

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
        self.absmax = x if self.absmax is None else torch.maximum(self.absmax, x)


def _submodule(block, name: str, index: int):
    try:
        return block.get_submodule(name)
    except AttributeError:
        message = f"smoothquant: decoder layer {index} has no {name}; only Llama-family blocks are supported"
        raise ModelError(message) from None


def _fold(src, how: str, linears: list, absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Divide `src`'s output channels by SmoothQuant's factors and multiply the linears' input columns by them."""
    scales = smoothing_scales(absmax, [lin.weight for lin in linears], alpha)
    # A norm's weight is [channels]; up_proj's weight is [channels, hidden], one row per channel.
    src.weight.div_(scales.reshape((-1,) if how == "norm" else (-1, 1)).to(src.weight.dtype))
    if how == "rows" and src.bias is not None:
        src.bias.div_(scales.to(src.bias.dtype))
    for lin in linears:
        lin.weight.mul_(scales.to(lin.weight.dtype))
    return scales


@torch.no_grad()
def smooth_layerwise(
    model, windows: list[torch.Tensor], alpha: float, progress: bool = True, head: str | None = None
) -> list[dict]:
    """Fold SmoothQuant factors into every decoder block of `model`, in place; one record per fold. `head` names the
    output linear to smooth too (its weight is untied from the embeddings first: they must keep theirs)."""
    if not windows:
        raise ValueError("smoothquant needs calibration windows")
    walk = BlockWalk(model, windows, "smoothquant", progress)
    records = []
    for step in walk:
        block, i = step.block, step.index
        folds = [
            (_submodule(block, src, i), how, [_submodule(block, n, i) for n in names]) for src, how, names in FOLDS
        ]
        stats = [InputAbsMax() for _ in folds]
        handles = [lin[0].register_forward_pre_hook(stat) for (_, _, lin), stat in zip(folds, stats, strict=True)]
        try:  # folding leaves the block's function as it is, so these outputs are the ones after it too
            step.outputs = [block_output(block(h, **step.kwargs)) for h in step.inputs]
        finally:
            for handle in handles:
                handle.remove()
        for (src, how, linears), stat, (src_name, _, names) in zip(folds, stats, FOLDS, strict=True):
            scales = _fold(src, how, linears, stat.absmax, alpha)
            records.append(
                {"layer": i, "absorbed_by": src_name, "linears": list(names), "max_scale": float(scales.max())}
            )
    if head:
        norm, linear = getattr(model.model, "norm", None), model.get_submodule(head)
        if norm is None or getattr(norm, "weight", None) is None:
            raise ModelError("smoothquant: the model has no final norm (model.norm) to fold lm_head's factors into")
        if linear.weight is model.get_input_embeddings().weight:
            linear.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        stat = InputAbsMax()
        for h in walk.hidden():
            stat(linear, (norm(h),))  # lm_head's input, without paying for lm_head itself
        scales = _fold(norm, "norm", [linear], stat.absmax, alpha)
        records.append(
            {"layer": None, "absorbed_by": "model.norm", "linears": [head], "max_scale": float(scales.max())}
        )
    return records
