"""sparamx.load: read -> build skeleton -> swap modules -> check. The artifact is read and checked by the pipeline's
reader; each linear runs as the artifact stored it (bitmap -> SparseLinear, dense -> DenseLinear), on our kernels."""

import warnings
from pathlib import Path

import torch

from ..pipeline.artifact_format import MANIFEST
from ..pipeline.artifact_reader import (
    PACKED_KEYS,
    assign_state,
    check_target,
    checked_packed,
    dense_model,
    int8_dense_weights,
    read_config,
    read_manifest,
    read_skeleton,
)
from ..pipeline.errors import ArtifactError, ModelError, RecipeError
from ..pipeline.kv_sparsity import KVConfig
from ..pipeline.models import decoder_layers, linear_modules
from . import cpu_paths, decode_step, ops
from . import kv_cache as kv_cache_module
from .modules import DenseLinear, SparseLinear


def load(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    verify: bool = True,
    kernels: bool | None = None,
    kv_sparsity: tuple[float, float] | None = None,
    kv_cache: bool | None = None,
    fused_decode: bool | None = None,
):
    """Load the artifact at `path` -> (model, tokenizer). `path` may also be a compressed-tensors checkpoint
    (pipeline/ct_checkpoint.py has what runs), or a hub id of one.

    kernels=True: every decoder linear runs on our kernels: bitmap ones as SparseLinear (weights stay packed), dense
    ones and lm_head as DenseLinear; int8 ones on the int8 kernels. Embeddings stay a torch module.
    kernels=False: packed linears are unpacked (and int8 ones dequantized) into dense nn.Linear weights, the reference
    the kernels are tested against, and the plain PyTorch path.
    kernels=None (default): True where the CPU runs our AVX2 / AVX-512 / AMX kernels or SPARAMX_ISA forces a path, else
    False with a warning (`cpu_paths.kernels_preferred`). `model.sparamx_runtime` says which.
    `verify` checks each file's sha256 first.
    kv_cache=True: generate() decodes through our KV cache and decode-attention op (kernels/kv_cache.py), with the
    artifact's recorded kv settings, (k, v) sparsity overridden by `kv_sparsity`. Default: so when `kv_sparsity` is
    given (0, 0 included: our dense cache), the artifact's recipe asks for a sparse cache, or the fused decode step
    runs (it needs our cache); else transformers' own cache and attention, as with kv_cache=False.
    fused_decode: generate() runs each new token through all decoder layers in one C++ call (kernels/decode_step.py),
    on our KV cache, with q/k/v and gate/up fused: the same tokens as the module-by-module path, without its per-token
    overhead. None (default): so where it can (kernels on, a Llama-family model, kv_cache not False); True: so or an
    error saying why not; False: off (or, after loading, model.sparamx_decode_step = None).
    """
    from transformers import AutoTokenizer

    path = _local_directory(path)
    manifest = read_manifest(path)
    kernels = _use_kernels(path) if kernels is None else kernels
    fused = _fused_decode(path, fused_decode, kernels, kv_cache)
    kv = _kv_settings(path, manifest, kv_sparsity, True if fused else kv_cache)
    if kernels:
        model = _kernel_model(path, manifest, dtype, verify)
        _quantize_activations_as_stored(model, manifest)
    else:
        model = dense_model(path, manifest, dtype, ops.bitmap_unpack, verify=verify)
    model.eval()
    if kv is not None:
        kv_cache_module.install(model, kv)
    if fused:
        _install_decode_step(model, fused_decode)
    model.sparamx_manifest = manifest
    model.sparamx_runtime = f"sparamx kernels: {cpu_paths.describe_isa()}" if kernels else "torch (weights unpacked)"
    if getattr(model, "sparamx_decode_step", None) is not None:
        model.sparamx_runtime += ", fused decode step"
    return model, AutoTokenizer.from_pretrained(path)


def _local_directory(path: str | Path) -> Path:
    """`path` itself, or for a hub id (org/name) that is no local directory, its snapshot (config, tokenizer and
    safetensors files only), downloaded once into the hub cache."""
    local = Path(path).expanduser()
    spec = str(path)
    if local.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return local
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as exc:  # offline and not cached, unknown or gated repo: all say why in their first line
        raise ArtifactError(
            f"{spec}: no such directory, and the hub cannot give it ({str(exc).splitlines()[0]})"
        ) from exc


def _kv_settings(path: Path, manifest: dict, sparsity, wanted: bool | None) -> KVConfig | None:
    """The KV cache to install (None: transformers' own), checked against the model family before any weight is
    read."""
    recorded = manifest.get("kv_sparsity") or {}
    try:
        kv = KVConfig.from_dict(recorded)
    except RecipeError as exc:
        raise ArtifactError(f"{path / MANIFEST}: kv_sparsity: {exc}") from exc
    if sparsity is not None:
        k, v = sparsity
        kv = KVConfig(**{**kv.to_dict(), "k_sparsity": k, "v_sparsity": v})
    if wanted is False:
        if sparsity is not None and kv.sparse:
            raise RecipeError("kv_sparsity needs the sparamx KV cache: it cannot be used with kv_cache=False")
        return None
    if not (wanted or sparsity is not None or kv.sparse):
        return None
    kv_cache_module.check_supported(read_config(path))
    return kv


def _fused_decode(path: Path, wanted: bool | None, kernels: bool, kv_cache: bool | None) -> bool:
    """Whether to install the fused decode step: checked before any weight is read when it is asked for."""
    if wanted is False:
        return False
    reason = None
    if not kernels:
        reason = "it runs our kernels, and this model is loaded without them"
    elif kv_cache is False:
        reason = "it runs on the sparamx KV cache, and kv_cache=False asks for transformers' cache"
    else:
        try:
            kv_cache_module.check_supported(read_config(path))
        except ModelError as exc:
            reason = str(exc)
    if reason and wanted:
        raise RecipeError(f"fused_decode=True: {reason}")
    return reason is None


def _install_decode_step(model, wanted: bool | None) -> None:
    try:
        decode_step.install(model)
    except ModelError:
        if wanted:
            raise
        model.sparamx_decode_step = None  # a layout the step does not run (e.g. an unpacked linear): module by module


def _use_kernels(path: Path) -> bool:
    if cpu_paths.kernels_preferred():
        return True
    missing = cpu_paths.missing_features("avx2")
    warnings.warn(
        f"sparamx.load: this CPU cannot run our kernels{f' (it lacks {missing})' if missing else ''}; "
        f"{path} runs on torch with its packed linears unpacked to dense weights (stock speed and memory). "
        "SPARAMX_ISA=reference forces the C++ reference kernels instead.",
        stacklevel=4,
    )
    return False


def _kernel_model(path: Path, manifest: dict, dtype: torch.dtype, verify: bool):
    model, config, tensors = read_skeleton(path, manifest, dtype, verify)
    state = {name: t for name, (_, t) in tensors.items()}
    swapped = _swap_packed(model, config, path, tensors, state)
    assign_state(model, config, path, state, swapped, dtype)
    _swap_dense(model)
    return model


def _quantize_activations_as_stored(model, manifest: dict) -> None:
    """A compressed-tensors checkpoint whose int8 activations are symmetric: so our int8 linears quantize them (our
    own artifacts, and asymmetric schemes, take the zero point)."""
    if (manifest.get("compressed_tensors") or {}).get("activations") == "symmetric":
        for module in model.modules():
            if isinstance(module, (SparseLinear, DenseLinear)) and module.int8:
                module.x_symmetric = True


def _swap_packed(model, config, path: Path, tensors: dict, state: dict) -> set[str]:
    """Put a SparseLinear in place of each bitmap linear and a DenseLinear in place of each int8 dense one, taking
    their tensors out of `state` (and freeing the canonical copies as the prepacked ones are made)."""
    swapped: set[str] = set()
    for prefix, args, cols, scale, _ in checked_packed(tensors, ops.bitmap_check):
        check_target(model, config, path, prefix, (args[1].shape[0], cols))
        for key in (*PACKED_KEYS, "weight_scale"):
            state.pop(f"{prefix}.{key}", None)
            tensors.pop(f"{prefix}.{key}", None)
        model.set_submodule(prefix, SparseLinear(*args, cols, state.pop(f"{prefix}.bias", None), scale))
        swapped.add(prefix)
        del args, scale
    for prefix, q, scale in list(int8_dense_weights(tensors)):
        check_target(model, config, path, prefix, tuple(q.shape))
        del state[f"{prefix}.weight"], state[f"{prefix}.weight_scale"]
        model.set_submodule(prefix, DenseLinear(q, state.pop(f"{prefix}.bias", None), scale))
        swapped.add(prefix)
    return swapped


def _swap_dense(model) -> None:
    """The decoder linears stored dense in bf16, and lm_head, run on the dense bf16 kernel too."""
    for i, layer in enumerate(decoder_layers(model)):
        for name, linear in linear_modules(layer, f"model.layers.{i}").items():
            if isinstance(linear, torch.nn.Linear):
                model.set_submodule(name, DenseLinear.from_linear(linear))
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):  # a tied head keeps the embedding; the kernel gets its own copy
        model.set_output_embeddings(DenseLinear.from_linear(head))
