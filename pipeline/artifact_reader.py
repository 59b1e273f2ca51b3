"""Artifact reader: the manifest and every stored tensor, checked before any kernel sees them, with errors that name
the file and tensor at fault; and the dense model an artifact describes (the reference path, and a source for later
stages). The kernels' loader builds on these; the format is artifact_format's.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import ct_checkpoint
from .artifact_format import FORMAT, MANIFEST, PACKED_KEYS, VERSION, sha256_file
from .errors import ArtifactError
from .quantize import dequantize


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact directory not found")
    if not file.is_file() and ct_checkpoint.is_checkpoint(path):
        return ct_checkpoint.read_checkpoint_manifest(path)
    if not file.is_file():
        raise ArtifactError(f"{path}: neither a sparamx artifact (no {MANIFEST}) nor a compressed-tensors checkpoint")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file}: 'format' is not {FORMAT!r}")
    version = str(manifest.get("format_version", ""))
    if version.split(".")[0] != VERSION.split(".")[0]:
        raise ArtifactError(
            f"{file}: format version {version!r} is not supported (this sparamx reads {VERSION.split('.')[0]}.x)"
        )
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise ArtifactError(f"{file}: 'files' lists no safetensors files")
    return manifest


def read_tensors(path: str | Path, manifest: dict, verify: bool = True) -> dict[str, tuple[str, torch.Tensor]]:
    """All stored tensors as name -> (file name, tensor), in our artifact's layout (a compressed-tensors checkpoint's
    are converted); checks each file's sha256 first when `verify` and the manifest has them."""
    path = Path(path)
    tensors: dict[str, tuple[str, torch.Tensor]] = {}
    foreign = ct_checkpoint.from_checkpoint(manifest)
    for filename, info in manifest["files"].items():
        file = path / filename
        if not file.is_file():
            raise ArtifactError(f"{file}: listed in {ct_checkpoint.INDEX if foreign else MANIFEST} but missing")
        if verify and not foreign and sha256_file(file) != info.get("sha256"):
            raise ArtifactError(f"{file}: sha256 does not match {MANIFEST} (truncated or modified file)")
        try:
            with safe_open(file, framework="pt") as fh:
                for name in fh.keys():
                    tensors[name] = (filename, fh.get_tensor(name))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{file}: corrupt safetensors file ({exc})") from exc
    return ct_checkpoint.as_artifact_tensors(tensors, manifest) if foreign else tensors


def packed_prefixes(tensors: dict) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in PACKED_KEYS})


def check_packed(prefix: str, tensors: dict) -> tuple[int, int]:
    """Validate the four canonical tensors of one packed linear before any kernel sees them; returns (out, in)."""
    for key in PACKED_KEYS:
        if f"{prefix}.{key}" not in tensors:
            raise ArtifactError(f"tensor {prefix}.{key} is missing ({prefix} has other packed tensors)")
    file, shape = tensors[f"{prefix}.shape"]
    where = f"{file}: tensor {prefix}"
    if shape.dtype != torch.int64 or shape.shape != (2,) or bool((shape < 0).any()):
        raise ArtifactError(
            f"{where}.shape must be int64 [2] of non-negative sizes, got {shape.dtype} {list(shape.shape)}"
        )
    rows, cols = (int(v) for v in shape)
    expected = {
        "bitmask": (torch.uint8, (rows, (cols + 7) // 8)),
        "row_offsets": (torch.int64, (rows,)),
    }
    for key, (dtype, dims) in expected.items():
        tensor = tensors[f"{prefix}.{key}"][1]
        if tensor.dtype != dtype or tuple(tensor.shape) != dims:
            raise ArtifactError(
                f"{where}.{key} must be {dtype} {list(dims)} for shape [{rows}, {cols}], "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
    compressed = tensors[f"{prefix}.compressed"][1]
    if compressed.dim() != 1:
        raise ArtifactError(f"{where}.compressed must be 1-D, got shape {list(compressed.shape)}")
    if compressed.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.int8):
        raise ArtifactError(f"{where}.compressed must be bfloat16, float16, float32 or int8, got {compressed.dtype}")
    return rows, cols


def weight_scale(tensors: dict, prefix: str, values: torch.Tensor, rows: int) -> torch.Tensor | None:
    """P.weight_scale as float32 [rows] when `values` (P.compressed or P.weight) are int8; None for float values.

    int8 values without a scale, a scale beside float values, or a scale of the wrong shape or sign are errors.
    """
    entry = tensors.get(f"{prefix}.weight_scale")
    if values.dtype != torch.int8:
        if entry is not None:
            raise ArtifactError(f"{entry[0]}: tensor {prefix}.weight_scale given, but {prefix}'s values are not int8")
        return None
    if entry is None:
        raise ArtifactError(f"tensor {prefix}.weight_scale is missing ({prefix} has int8 values)")
    file, scale = entry
    if not scale.is_floating_point() or scale.numel() != rows or scale.dim() not in (1, 2):
        raise ArtifactError(
            f"{file}: tensor {prefix}.weight_scale must be float [{rows}, 1], got {scale.dtype} {list(scale.shape)}"
        )
    scale = scale.reshape(-1).float()
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ArtifactError(f"{file}: tensor {prefix}.weight_scale must be finite and positive")
    return scale


def checked_packed(tensors: dict, check: Callable):
    """Yield (prefix, (compressed, bitmask, row_offsets), in_features, scale, check's result) for each packed linear,
    after the Python shape checks and `check` (a C++ op that raises on inconsistent popcounts), with errors naming
    the file and tensor. scale is P.weight_scale as float32 [out] for int8 values, else None."""
    for prefix in packed_prefixes(tensors):
        rows, cols = check_packed(prefix, tensors)
        file = tensors[f"{prefix}.bitmask"][0]
        args = tuple(tensors[f"{prefix}.{k}"][1] for k in ("compressed", "bitmask", "row_offsets"))
        scale = weight_scale(tensors, prefix, args[0], rows)
        try:
            result = check(*args, cols)
        except RuntimeError as exc:
            message = str(exc).splitlines()[0]
            raise ArtifactError(f"{file}: packed tensor {prefix} is inconsistent: {message}") from exc
        yield prefix, args, cols, scale, result


def int8_dense_weights(tensors: dict):
    """Yield (prefix, q, scale) for each dense int8 P.weight (with its checked P.weight_scale)."""
    for name, (_, tensor) in tensors.items():
        if name.endswith(".weight") and tensor.dtype == torch.int8:
            prefix = name.removesuffix(".weight")
            yield prefix, tensor, weight_scale(tensors, prefix, tensor, tensor.shape[0])


def dense_tensors(tensors: dict, unpack: Callable) -> dict[str, torch.Tensor]:
    """Replace each packed linear with its dense `P.weight` through `unpack` (the C++ op), and dequantize int8 weights
    (w = scale * q, float32); the rest pass through."""
    dense = {name: t for name, (_, t) in tensors.items()}
    for prefix, _, _, scale, weight in checked_packed(tensors, unpack):
        dense[f"{prefix}.weight"] = dequantize(weight, scale) if scale is not None else weight
        for key in PACKED_KEYS:
            del dense[f"{prefix}.{key}"]
        dense.pop(f"{prefix}.weight_scale", None)
    for prefix, q, scale in list(int8_dense_weights(tensors)):
        dense[f"{prefix}.weight"] = dequantize(q, scale)
        del dense[f"{prefix}.weight_scale"]
    return dense


def read_config(path: Path):
    """The artifact's transformers config, without the quantization_config (it describes the files, not a quantizer
    transformers should apply)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path / 'config.json'}: cannot be read ({str(exc).splitlines()[0]})") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def build_skeleton(path: Path, config, dtype: torch.dtype, tensors: dict):
    """The model `config` describes, on the meta device (no memory) until assign_state gives it the stored tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = next((n for n, mod in model.named_modules() if mod is model.get_output_embeddings()), None)
    if config.tie_word_embeddings and f"{head}.weight" in tensors:  # re-tying would silently drop the stored head
        raise ArtifactError(
            f"{path / 'config.json'}: ties {head} to the embeddings, but the artifact stores {head}.weight "
            "of its own; it needs tie_word_embeddings: false"
        )
    return model


def check_target(model, config, path: Path, prefix: str, shape: tuple[int, int]) -> None:
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


def assign_state(model, config, path: Path, state: dict, replaced: set[str], dtype: torch.dtype) -> None:
    """Give the skeleton its stored tensors (in `dtype` where floating), after checking that they are exactly the
    ones it needs, less the modules in `replaced` (already swapped for packed ones) and the tied head."""
    expected = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in replaced}
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


def read_skeleton(path: Path, manifest: dict, dtype: torch.dtype, verify: bool = True):
    """(model skeleton, config, stored tensors) of the artifact at `path` whose manifest is `manifest`."""
    tensors = read_tensors(path, manifest, verify=verify)
    config = read_config(path)
    return build_skeleton(path, config, dtype, tensors), config, tensors


def dense_model(path: Path, manifest: dict, dtype: torch.dtype, unpack: Callable, verify: bool = True):
    """The artifact as a plain transformers model: packed linears unpacked by `unpack` (the C++ op, or the pure-torch
    reference), int8 weights dequantized."""
    model, config, tensors = read_skeleton(path, manifest, dtype, verify)
    assign_state(model, config, path, dense_tensors(tensors, unpack), set(), dtype)
    return model


def read_dense_model(path: str | Path, dtype: torch.dtype, unpack: Callable, verify: bool = True):
    """dense_model of the artifact at `path`, in eval mode, with `sparamx_manifest` set."""
    path = Path(path)
    manifest = read_manifest(path)
    model = dense_model(path, manifest, dtype, unpack, verify).eval()
    model.sparamx_manifest = manifest
    return model
