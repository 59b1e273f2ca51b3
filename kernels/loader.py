"""sparamx.load: rebuild a transformers model from an artifact, its packed linears on our kernels (or unpacked)."""

import warnings
from pathlib import Path

import torch

from ..pipeline.artifact import (
    PACKED_KEYS,
    checked_packed,
    dense_tensors,
    int8_dense_weights,
    read_manifest,
    read_tensors,
)
from ..pipeline.errors import ArtifactError
from ..pipeline.models import decoder_layers, linear_modules, output_linear_name
from . import ops
from .modules import DenseLinear, SparseLinear


def load(path: str | Path, dtype: torch.dtype = torch.bfloat16, verify: bool = True, kernels: bool | None = None):
    """Load the artifact at `path` -> (model, tokenizer).

    kernels=True: every decoder linear runs on our kernels: bitmap ones as SparseLinear (weights stay packed), dense
    ones and lm_head as DenseLinear; int8 ones on the int8 kernels. Embeddings stay a torch module.
    kernels=False: packed linears are unpacked (and int8 ones dequantized) into dense nn.Linear weights, the reference
    the kernels are tested against, and the plain PyTorch path.
    kernels=None (default): True where the CPU runs our AVX2 / AVX-512 / AMX kernels or SPARAMX_ISA forces a path, else
    False with a warning (`ops.kernels_preferred`). `model.sparamx_runtime` says which.
    `verify` checks each file's sha256 first.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    if kernels is None:
        kernels = ops.kernels_preferred()
        if not kernels:
            missing = ops.missing_features("avx2")
            warnings.warn(
                f"sparamx.load: this CPU cannot run our kernels{f' (it lacks {missing})' if missing else ''}; "
                f"{path} runs on torch with its packed linears unpacked to dense weights (stock speed and memory). "
                "SPARAMX_ISA=reference forces the C++ reference kernels instead.",
                stacklevel=3,
            )
    tensors = read_tensors(path, manifest, verify=verify)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path / 'config.json'}: cannot be read ({str(exc).splitlines()[0]})") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # describes the files, not a quantizer transformers should apply
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = output_linear_name(model)
    if config.tie_word_embeddings and f"{head}.weight" in tensors:  # re-tying would silently drop the stored head
        raise ArtifactError(
            f"{path / 'config.json'}: ties {head} to the embeddings, but the artifact stores {head}.weight "
            "of its own; it needs tie_word_embeddings: false"
        )
    packed: set[str] = set()
    if kernels:
        state = {name: t for name, (_, t) in tensors.items()}
        for prefix, args, cols, scale, _ in checked_packed(tensors, ops.bitmap_check):
            _check_target(model, config, path, prefix, (args[1].shape[0], cols))
            for key in PACKED_KEYS:
                del state[f"{prefix}.{key}"]
            state.pop(f"{prefix}.weight_scale", None)
            bias = state.pop(f"{prefix}.bias", None)
            model.set_submodule(prefix, packed_linear(*args, cols, bias, scale))
            packed.add(prefix)
            for key in (*PACKED_KEYS, "weight_scale"):  # the prepacked copy replaces them: free them as we go
                tensors.pop(f"{prefix}.{key}", None)
            del args, scale, bias
        for prefix, q, scale in list(int8_dense_weights(tensors)):
            _check_target(model, config, path, prefix, tuple(q.shape))
            del state[f"{prefix}.weight"], state[f"{prefix}.weight_scale"]
            model.set_submodule(prefix, DenseLinear(q, state.pop(f"{prefix}.bias", None), scale))
            packed.add(prefix)
    else:
        state = dense_tensors(tensors, ops.bitmap_unpack)

    expected = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in packed}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ArtifactError(f"{path}: tensor {unknown[0]} does not belong to a {config.model_type} model")
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise ArtifactError(f"{path}: tensor {missing[0]} is missing (neither dense nor packed)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ArtifactError(
                f"{path}: tensor {name} has shape {list(tensor.shape)}, the model needs {list(expected[name].shape)}"
            )
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if kernels:  # the decoder linears stored dense in bf16, and lm_head, run on the dense bf16 kernel too
        for i, layer in enumerate(decoder_layers(model)):
            for name, linear in linear_modules(layer, f"model.layers.{i}").items():
                if isinstance(linear, torch.nn.Linear):
                    model.set_submodule(name, DenseLinear.from_linear(linear))
        head = model.get_output_embeddings()
        if isinstance(head, torch.nn.Linear):  # a tied head keeps the embedding; the kernel gets its own copy
            model.set_output_embeddings(DenseLinear.from_linear(head))
    model.eval()
    model.sparamx_manifest = manifest
    model.sparamx_runtime = f"sparamx kernels: {ops.describe_isa()}" if kernels else "torch (weights unpacked)"
    return model, AutoTokenizer.from_pretrained(path)


# Below these sparsities a bitmap layer runs faster on the dense kernel: it saves too few bytes to pay for its lower
# streaming efficiency (eval/results/kernels.md, M = 1: bitmap ~85-90% of the read bandwidth, dense ~95-100%; the
# byte counts then cross at ~16% sparsity for bf16 and ~22% for int8). At 30%, the lowest measured, the bitmap wins.
DENSE_BELOW = {torch.bfloat16: 0.2, torch.int8: 0.25}


def packed_linear(compressed, bitmask, row_offsets, in_features: int, bias=None, weight_scale=None):
    """SparseLinear, or DenseLinear over the unpacked weight where the layer is too dense for the bitmap to pay."""
    sparsity = 1.0 - compressed.numel() / max(1, bitmask.shape[0] * in_features)
    if sparsity < DENSE_BELOW.get(compressed.dtype, 0.0):
        weight = ops.bitmap_unpack(compressed, bitmask, row_offsets, in_features)
        return DenseLinear(weight.to(torch.bfloat16) if weight.is_floating_point() else weight, bias, weight_scale)
    return SparseLinear(compressed, bitmask, row_offsets, in_features, bias, weight_scale)


def _check_target(model, config, path: Path, prefix: str, shape: tuple[int, int]) -> None:
    """The stored linear `prefix` must name an nn.Linear of the model with the same [out, in]."""
    try:
        linear = model.get_submodule(prefix)
    except AttributeError:
        linear = None
    if not isinstance(linear, torch.nn.Linear):
        raise ArtifactError(f"{path}: packed tensor {prefix} does not name a linear of a {config.model_type} model")
    if tuple(shape) != (linear.out_features, linear.in_features):
        raise ArtifactError(
            f"{path}: packed tensor {prefix} is [{shape[0]}, {shape[1]}], "
            f"the model needs [{linear.out_features}, {linear.in_features}]"
        )
