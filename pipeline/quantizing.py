"""INT8 weight quantization's lifecycle: which linears, in which order, with which statistics. The math is in
quantize.py (round to nearest, or GPTQ against X^T X); this file only walks the model.

GPTQ walks the decoder blocks as the pruning stage does: each block's linears are quantized group by group in
execution order (q/k/v, o, gate/up, down), each group's X^T X taken from the block with the groups before it already
quantized, and the block's outputs on the quantized weights feed the next block (GPTQ's sequential mode); then the
block gets its float weights back, so the model keeps its pruning mask (an int8 value that rounds to 0 is still a
kept weight). With an int8 lm_head, its X^T X is taken on the final norm's outputs.
"""

import torch

from .layerwise import BlockWalk, InputStats, block_output, collect_input_stats, input_groups
from .models import linear_modules
from .quantize import dequantize, gptq_per_channel, quantize_per_channel
from .recipe import QuantizeConfig

Quantized = dict[str, tuple[torch.Tensor, torch.Tensor]]  # linear name -> (int8 values [out, in], fp32 scale [out])


@torch.no_grad()
def quantize_weights(
    model, names: list[str], config: QuantizeConfig, windows: list[torch.Tensor] | None, progress: bool = True
) -> Quantized:
    """Quantize the linears `names` (decoder linears, and the output linear if named) to per-channel int8 as
    `config.method` says; `model` is left as it was."""
    if config.method == "rtn":
        return {name: quantize_per_channel(_weight(model, name)) for name in names}
    if not windows:
        raise ValueError("gptq needs calibration windows")
    wanted = set(names)
    out: Quantized = {}
    walk = BlockWalk(model, windows, "gptq", progress)
    for step in walk:
        block = step.block
        linears = {n: m for n, m in linear_modules(block, f"model.layers.{step.index}").items() if n in wanted}
        floats = {name: linear.weight.detach().clone() for name, linear in linears.items()}
        if linears:
            for group in input_groups(block, linears, step.inputs[0], step.kwargs):
                stats = collect_input_stats(block, linears, group, step.inputs, step.kwargs, gram=True)
                for name in group:
                    out[name] = gptq_per_channel(linears[name].weight, stats[name].gram, config.damp)
                    linears[name].weight.copy_(dequantize(*out[name]))
                del stats
        step.outputs = [block_output(block(h, **step.kwargs)) for h in step.inputs]  # on the quantized weights
        for name, weight in floats.items():
            linears[name].weight.copy_(weight)
    for name in sorted(wanted - set(out)):  # the output linear: its input is the final norm's output
        linear = model.get_submodule(name)
        stats = InputStats(linear.in_features, gram=True)
        for h in walk.hidden():
            stats(linear, (model.model.norm(h),), None)
        out[name] = gptq_per_channel(linear.weight.detach(), stats.gram, config.damp)
    return out


def _weight(model, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach()
