"""The pruning lifecycle: walk the decoder blocks one at a time, collect statistics with hooks, prune, move on.

For Wanda the calibration activations entering block i are the outputs of block i-1 *after* it was pruned
(as in the paper's code), so errors are measured where they land. Peak memory is the model plus the activations
of one block for the calibration windows.
"""

import time

import torch
from tqdm.auto import tqdm

from .models import decoder_layers, linear_modules
from .pruning import apply_mask_, magnitude_scores, prune_mask, refit_kept_weights, wanda_scores, wanda_sweep
from .recipe import PruneConfig


class _StopForward(Exception):
    pass


class InputStats:
    """Forward hook state over all calibration tokens of one linear's input: the sum of x_j^2 per column, or with
    gram=True the whole X^T X (its diagonal is those sums), which the least-squares refit needs."""

    def __init__(self, in_features: int, gram: bool = False):
        # fp32 as SparseGPT keeps it: a Llama-3-8B down_proj's is already 0.8 GB
        self.gram = torch.zeros((in_features, in_features), dtype=torch.float32) if gram else None
        self._sums = None if gram else torch.zeros(in_features, dtype=torch.float64)

    @property
    def sums(self) -> torch.Tensor:
        return self.gram.diagonal().double() if self.gram is not None else self._sums

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
        else:
            self._sums += x.square().sum(dim=0, dtype=torch.float64)


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


def block_output(out):
    return out[0] if isinstance(out, tuple) else out


def input_groups(block, linears: dict, hidden: torch.Tensor, block_kwargs: dict) -> list[list[str]]:
    """Linears in the order the block runs them, grouped when they read the same input (q/k/v; gate/up)."""
    # The inputs themselves are kept for this one pass and compared by identity: comparing addresses would let a
    # freed input's memory, reused for the next one, merge groups that do not share an input.
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        mod.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args[0])))
        for name, mod in linears.items()
    ]
    try:
        block(hidden, **block_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, tensor in calls:
        if any(name in group for group in groups):
            continue
        if groups and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = tensor
    missing = sorted(set(linears) - {name for name, _ in calls})
    if missing:
        raise ValueError(f"{missing[0]} never runs in its block's forward; cannot collect its input statistics")
    return groups


def _stop_after(module):
    def hook(mod, args, out):
        raise _StopForward

    return module.register_forward_hook(hook)


@torch.no_grad()
def collect_input_stats(block, linears: dict, names: list[str], hidden, block_kwargs, gram: bool) -> dict:
    """InputStats over all calibration tokens for each linear in `names`; the forward stops after the last one."""
    stats = {name: InputStats(linears[name].in_features, gram) for name in names}
    handles = [linears[name].register_forward_hook(stats[name]) for name in names]
    handles.append(_stop_after(linears[names[-1]]))
    try:
        for h in hidden:
            try:
                block(h, **block_kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _prune_linear(name: str, module, config: PruneConfig, stats: InputStats | None = None) -> dict:
    weight = module.weight.data
    sparsity = config.sparsity_for(name)
    if sparsity > 0 or config.nm:
        if config.adaptive_mask:  # the sweep scores each block of columns itself, on the weights refit so far
            weight.copy_(wanda_sweep(weight, stats.gram, sparsity, config.nm, config.refit_damp))
        else:
            scores = magnitude_scores(weight) if stats is None else wanda_scores(weight, stats.sums)
            mask = prune_mask(scores, sparsity, config.nm, config.group)
            if config.refit:
                weight.copy_(refit_kept_weights(weight, mask, stats.gram, config.refit_damp))
            else:
                apply_mask_(weight, mask)
    nnz = int(torch.count_nonzero(weight))
    return {
        "name": name,
        "shape": list(weight.shape),
        "target": sparsity,
        "nnz": nnz,
        "sparsity": 1.0 - nnz / weight.numel(),
    }


@torch.no_grad()
def prune_layerwise(model, config: PruneConfig, windows: list[torch.Tensor] | None, progress: bool = True) -> list:
    """Prune every decoder linear of `model` in place; returns one record per linear (name, shape, sparsity, nnz).

    With config.sequential, the linears of a block are pruned group by group in execution order, each group's input
    statistics taken from the block with the groups before it already pruned (SparseGPT's "true sequential").
    """
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
        if config.method == "magnitude":
            done = {name: _prune_linear(name, mod, config) for name, mod in linears.items()}
        else:
            done = {}
            groups = input_groups(block, linears, hidden[0], block_kwargs)
            if not config.sequential:
                groups = [[name for group in groups for name in group]]
            for group in groups:
                stats = collect_input_stats(block, linears, group, hidden, block_kwargs, config.refit)
                done.update({name: _prune_linear(name, linears[name], config, stats[name]) for name in group})
                del stats
            if i + 1 < len(layers):
                hidden = [block_output(block(h, **block_kwargs)) for h in hidden]
        records += [done[name] for name in linears]
        bar.set_postfix(seconds=f"{time.perf_counter() - start:.1f}")
    return records
