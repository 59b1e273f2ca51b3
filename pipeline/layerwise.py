"""The calibrated stages' lifecycle: one walk over the decoder blocks (BlockWalk) that every calibrated stage --
Wanda pruning here, SmoothQuant (smoothing.py), GPTQ (quantizing.py) -- runs its block step in, with the hooks that
collect input statistics; and the pruning stage itself.

The calibration activations entering block i are the outputs of block i-1 *after* the stage changed it (as in the
Wanda and GPTQ papers' code), so errors are measured where they land. Peak memory is the model plus the activations
of one block for the calibration windows, llm-compressor's sequential pipeline, plus what the replays keep (replay.py:
the results a block's later passes would compute again, within a budget).
"""

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .artifact_format import LayerRecord
from .models import decoder_layers, linear_modules
from .pruning import PRUNING_METHODS, apply_mask_, prune_mask, refit_kept_weights, wanda_sweep
from .recipe import PruneConfig
from .replay import AttentionReplay, LinearReplay


class _StopForward(Exception):
    pass


class InputStats:
    """Forward hook state over all calibration tokens of one linear's input: the sum of x_j^2 per column, or with
    gram=True the whole X^T X (its diagonal is those sums), which the least-squares refit needs."""

    TILE = 128  # X^T X is symmetric: only tiles on and above the diagonal are computed, then mirrored (~40% less)

    def __init__(self, in_features: int, gram: bool = False):
        # fp32 as SparseGPT keeps it: a Llama-3-8B down_proj's is already 0.8 GB
        self._gram = torch.zeros((in_features, in_features), dtype=torch.float32) if gram else None
        self._mirrored = True
        self._sums = None if gram else torch.zeros(in_features, dtype=torch.float64)

    @property
    def gram(self) -> torch.Tensor | None:
        if self._gram is not None and not self._mirrored:
            g, t = self._gram, self.TILE
            for i in range(t, g.shape[0], t):
                g[i:, i - t : i] = g[i - t : i, i:].T
            self._mirrored = True
        return self._gram

    @property
    def sums(self) -> torch.Tensor:
        return self._gram.diagonal().double() if self._gram is not None else self._sums

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if self._gram is not None:
            t = self.TILE
            for i in range(0, x.shape[1], t):
                self._gram[i : i + t, i:].addmm_(x[:, i : i + t].T, x[:, i:])
            self._mirrored = False
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


@dataclass
class BlockStep:
    """Decoder block `index` with the calibration activations entering it. A stage that already ran the block as it
    leaves it (same function) may set `outputs`; otherwise the walk runs the block after the stage's step."""

    index: int
    block: torch.nn.Module
    inputs: list[torch.Tensor]
    kwargs: dict
    outputs: list[torch.Tensor] | None = None


class BlockWalk:
    """`for step in BlockWalk(model, windows, "wanda"): <change step.block>`: each block once, in order, fed the
    previous block's outputs as changed; `hidden()` afterwards gives the last block's outputs (the final norm's input).
    While a block is stepped, its attention and its linears run through the replays.
    """

    def __init__(self, model, windows: list[torch.Tensor], desc: str, progress: bool = True):
        self.layers = decoder_layers(model)
        self._config = model.config
        self._hidden, self.kwargs = capture_block_inputs(model, windows)
        self._desc, self._progress = desc, progress
        self._pending: BlockStep | None = None

    def __iter__(self):
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        config = self._config
        inner = config._attn_implementation
        # Only an implementation from the registry can be wrapped; a model's own eager attention runs as it is.
        replay = AttentionReplay(inner) if inner in ALL_ATTENTION_FUNCTIONS else None
        if replay is not None:
            AttentionInterface.register(AttentionReplay.NAME, replay)
            config._attn_implementation = AttentionReplay.NAME
        bar = tqdm(range(len(self.layers)), desc=self._desc, unit="layer", disable=not self._progress)
        try:
            for i in bar:
                start = time.perf_counter()
                step = BlockStep(i, self.layers[i], self.hidden(), self.kwargs)
                with LinearReplay(linear_modules(step.block, "").values()):
                    yield step
                    self._pending = step
                    if i + 1 < len(self.layers):
                        self.hidden()  # the outputs, while this block's results are still kept
                if replay is not None:
                    replay.store.reset()
                bar.set_postfix(seconds=f"{time.perf_counter() - start:.1f}")
        finally:
            config._attn_implementation = inner
            if replay is not None:
                replay.store.reset()  # no tensors stay referenced from the global registry

    def hidden(self) -> list[torch.Tensor]:
        """The activations after the last block stepped (its outputs are computed on first need: the last block's
        only when a stage asks for them)."""
        step, self._pending = self._pending, None
        if step is not None:
            outputs = step.outputs
            if outputs is None:
                with torch.no_grad():
                    outputs = [block_output(step.block(h, **step.kwargs)) for h in step.inputs]
            self._hidden = outputs
        return self._hidden


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
def collect_input_stats(
    block, linears: dict, names: list[str], hidden, block_kwargs, gram: bool, shared_input: bool = True
) -> dict:
    """InputStats over all calibration tokens for each linear in `names`. With `shared_input` (a group from
    input_groups: the linears read one tensor), the statistics are taken once, from the first linear's input, and the
    forward stops there, before the group's own linears run; otherwise each linear's own input is used and the
    forward stops after the last one."""
    if shared_input:
        shared = InputStats(linears[names[0]].in_features, gram)
        stats = {name: shared for name in names}
        handles = [linears[names[0]].register_forward_pre_hook(_record_and_stop(shared))]
    else:
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


def _record_and_stop(stats: InputStats):
    def hook(module, args):
        stats(module, args, None)
        raise _StopForward

    return hook


def _prune_linear(name: str, module, config: PruneConfig, stats: InputStats | None = None) -> LayerRecord:
    weight = module.weight.data
    sparsity = config.sparsity_for(name)
    if sparsity > 0 or config.nm:
        if config.adaptive_mask:  # the sweep scores each block of columns itself, on the weights refit so far
            weight.copy_(wanda_sweep(weight, stats.gram, sparsity, config.nm, config.refit_damp))
        else:
            scores = PRUNING_METHODS[config.method].scores(weight, stats.sums if stats is not None else None)
            mask = prune_mask(scores, sparsity, config.nm, config.group)
            if config.refit:
                weight.copy_(refit_kept_weights(weight, mask, stats.gram, config.refit_damp))
            else:
                apply_mask_(weight, mask)
    return LayerRecord(name, tuple(weight.shape), sparsity, int(torch.count_nonzero(weight)))


@torch.no_grad()
def prune_layerwise(
    model, config: PruneConfig, windows: list[torch.Tensor] | None, progress: bool = True
) -> list[LayerRecord]:
    """Prune every decoder linear of `model` in place; returns one record per linear (name, shape, target, nnz).

    A calibrated method walks the blocks (BlockWalk); with config.sequential, the linears of a block are pruned group
    by group in execution order, each group's input statistics taken from the block with the groups before it
    already pruned (SparseGPT's "true sequential").
    """
    if not PRUNING_METHODS[config.method].calibrated:
        layers = decoder_layers(model)
        bar = tqdm(range(len(layers)), desc=f"{config.method} pruning", unit="layer", disable=not progress)
        return [
            _prune_linear(name, linear, config)
            for i in bar
            for name, linear in linear_modules(layers[i], f"model.layers.{i}").items()
        ]
    if not windows:
        raise ValueError(f"{config.method} pruning needs calibration windows")
    records = []
    for step in BlockWalk(model, windows, f"{config.method} pruning", progress):
        linears = linear_modules(step.block, f"model.layers.{step.index}")
        groups = input_groups(step.block, linears, step.inputs[0], step.kwargs)
        if not config.sequential:
            groups = [[name for group in groups for name in group]]
        done = {}
        for group in groups:
            stats = collect_input_stats(
                step.block, linears, group, step.inputs, step.kwargs, config.refit, shared_input=config.sequential
            )
            done.update({name: _prune_linear(name, linears[name], config, stats[name]) for name in group})
            del stats
        records += [done[name] for name in linears]
    return records
