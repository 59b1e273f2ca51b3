"""The pruning lifecycle: walk the decoder blocks one at a time, collect statistics with hooks, prune, move on.

For Wanda the calibration activations entering block i are the outputs of block i-1 *after* it was pruned
(as in the paper's code), so errors are measured where they land. Peak memory is the model plus the activations
of one block for the calibration windows.
"""

import time

import torch
from tqdm.auto import tqdm

from .models import decoder_layers, linear_modules
from .pruning import apply_mask_, magnitude_scores, prune_mask, wanda_scores
from .recipe import PruneConfig


class _StopForward(Exception):
    pass


class InputSquareSums:
    """Forward hook state: sum over all calibration tokens of x_j^2, per input column of one linear."""

    def __init__(self, in_features: int):
        self.sums = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.sums += x.square().sum(dim=0, dtype=torch.float64)
        self.tokens += x.shape[0]


@torch.no_grad()
def capture_block_inputs(model, windows: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering the first decoder block for each window, and the keyword arguments the block receives
    (rotary position embeddings, masks), captured by a pre-hook that stops the forward there."""
    captured: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(module, args, kw):
        captured.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in windows:
            try:
                model.model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured, kwargs


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune_layerwise(model, config: PruneConfig, windows: list[torch.Tensor] | None, progress: bool = True) -> list:
    """Prune every decoder linear of `model` in place; returns one record per linear (name, shape, sparsity, nnz)."""
    if config.method == "wanda" and not windows:
        raise ValueError("wanda pruning needs calibration windows")
    layers = decoder_layers(model)
    hidden, block_kwargs = capture_block_inputs(model, windows) if config.method == "wanda" else (None, {})
    records = []
    bar = tqdm(range(len(layers)), desc=f"{config.method} pruning", unit="layer", disable=not progress)
    for i in bar:
        start = time.perf_counter()
        block = layers[i]
        linears = linear_modules(block, f"model.layers.{i}")
        if config.method == "wanda":
            stats = {name: InputSquareSums(mod.in_features) for name, mod in linears.items()}
            handles = [mod.register_forward_hook(stats[name]) for name, mod in linears.items()]
            try:
                for h in hidden:
                    block(h, **block_kwargs)
            finally:
                for handle in handles:
                    handle.remove()
        for name, mod in linears.items():
            weight = mod.weight.data
            if config.method == "wanda":
                scores = wanda_scores(weight, stats[name].sums)
            else:
                scores = magnitude_scores(weight)
            sparsity = config.sparsity_for(name)
            if sparsity > 0 or config.nm:
                apply_mask_(weight, prune_mask(scores, sparsity, config.nm, config.group))
            nnz = int(torch.count_nonzero(weight))
            records.append(
                {
                    "name": name,
                    "shape": list(weight.shape),
                    "target": sparsity,
                    "nnz": nnz,
                    "sparsity": 1.0 - nnz / weight.numel(),
                }
            )
        if config.method == "wanda" and i + 1 < len(layers):
            hidden = [_block_output(block(h, **block_kwargs)) for h in hidden]
        bar.set_postfix(seconds=f"{time.perf_counter() - start:.1f}")
    return records
