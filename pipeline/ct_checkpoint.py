"""compressed-tensors checkpoints that others made (llm-compressor's sparse and INT8 models), read as artifacts: the
config is checked against what our kernels run before any weight is read, and the stored tensors become the ones our
own artifact holds (its format is compressed-tensors' sparse-bitmask), so the reader's checks and the loader run them
unchanged. Supported, alone or stacked:
- quantization `int-quantized`: int8 weights with channel-wise symmetric scales, activations int8 dynamic per token
  (our int8 kernels, quantizing activations as the scheme says: symmetric, or with a zero point) or none (W8A16:
  dequantized to the dense bf16 kernel, with a warning);
- sparsity `sparse-bitmask` (our layout), `sparse-24-bitmask` (2:4: every row keeps half its columns, so the row
  offsets are implied), and `dense` (zeros stored in place), packed at load where sparse enough.
"""

import json
import warnings
from pathlib import Path

import torch

from .artifact_format import MANIFEST, PACKED_KEYS, LayerRecord
from .bitmap import pack_reference
from .errors import ArtifactError
from .quantize import dequantize

SOURCE_FORMAT = "compressed-tensors"
SUPPORTED = (
    "int-quantized W8A8 / W8A16 (int8 weights, channel-wise symmetric; activations int8 dynamic per token, or none) "
    "and the sparse-bitmask / sparse-24-bitmask / dense sparsity formats"
)
QUANT_FORMATS = ("int-quantized", "naive-quantized")
SPARSITY_FORMATS = ("sparse-bitmask", "sparse-24-bitmask", "dense")
INDEX = "model.safetensors.index.json"
# quantization_config keys besides QuantizationConfig's own fields; a transform (rotations) or expert sparsity changes
# what the weights mean, so those must be empty.
OTHER_KEYS = ("sparsity_config", "transform_config", "version")
MUST_BE_EMPTY = ("transform_config", "moe_sparsity_config")


def is_checkpoint(path: Path) -> bool:
    """A model directory whose config.json has a compressed-tensors quantization_config, and no sparamx.json."""
    config = path / "config.json"
    if not config.is_file() or (path / MANIFEST).exists():
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == SOURCE_FORMAT


def from_checkpoint(manifest: dict) -> bool:
    """Whether `manifest` is read_checkpoint_manifest's (a compressed-tensors checkpoint, not our artifact)."""
    return manifest.get("source_format") == SOURCE_FORMAT


def read_checkpoint_manifest(path: Path) -> dict:
    """The manifest our loader reads, for the checkpoint at `path`: its files, and its formats as checked here (one
    line naming the format or scheme at fault otherwise). `layers` is filled in by as_artifact_tensors."""
    config_file = path / "config.json"
    quant = json.loads(config_file.read_text())["quantization_config"]
    where = f"{config_file}: quantization_config"
    _check_keys(quant, where)
    schemes = _quantization_schemes(quant, where)
    activations = sorted({s["activations"] for s in schemes.values()})
    if len(activations) > 1:
        raise ArtifactError(
            f"{where}: config groups quantize activations differently ({', '.join(activations)}); "
            f"supported: {SUPPORTED} with one activation scheme"
        )
    sparsity = _sparsity_config(quant, where)
    return {
        "source_format": SOURCE_FORMAT,
        "compressed_tensors": {
            "version": quant.get("version"),
            "activations": activations[0] if activations else None,
            "sparsity": sparsity,
        },
        "source_model": {"name": str(path), "kind": "artifact", "location": str(path.resolve())},
        "recipe": None,
        "layers": [],
        "lm_head": None,
        "kv_sparsity": {},
        "eval": None,
        "files": _files(path),
    }


def _check_keys(quant: dict, where: str) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    unknown = sorted(set(quant) - set(QuantizationConfig.model_fields) - set(OTHER_KEYS))
    if unknown:
        raise ArtifactError(f"{where}: unknown key {unknown[0]!r}; supported: {SUPPORTED}")
    for key in MUST_BE_EMPTY:
        if quant.get(key):
            raise ArtifactError(
                f"{where}.{key} is not supported (it changes what the weights mean); supported: {SUPPORTED}"
            )


def _quantization_schemes(quant: dict, where: str) -> dict[str, dict]:
    """Each config group's scheme, checked: int8 channel-wise symmetric static weights; activations int8 per token
    dynamic or none; no output or KV-cache quantization."""
    from compressed_tensors.quantization import QuantizationConfig

    groups = quant.get("config_groups") or {}
    if not groups:
        return {}
    try:
        config = QuantizationConfig.model_validate(quant)
    except ValueError as exc:
        raise ArtifactError(f"{where} is not valid ({str(exc).splitlines()[0]})") from exc
    if config.kv_cache_scheme is not None:
        raise ArtifactError(f"{where}: kv_cache_scheme (a quantized KV cache) is not supported; supported: {SUPPORTED}")
    out = {}
    for name, scheme in config.config_groups.items():
        fmt = scheme.format or config.format
        w, a = scheme.weights, scheme.input_activations
        described = f"{where}.config_groups.{name} (format {fmt}, weights {_describe(w)}, activations {_describe(a)})"
        weights = None if w is None else (w.type, w.num_bits, w.strategy, w.symmetric, w.dynamic)
        weights_ok = weights == ("int", 8, "channel", True, False)
        acts_ok = a is None or (a.type, a.num_bits, a.strategy, a.dynamic) == ("int", 8, "token", True)
        if fmt not in QUANT_FORMATS or not weights_ok or not acts_ok or scheme.output_activations is not None:
            raise ArtifactError(f"{described} is not supported; supported: {SUPPORTED}")
        out[name] = {"activations": "none" if a is None else "symmetric" if a.symmetric else "asymmetric"}
    return out


def _describe(args) -> str:
    if args is None:
        return "none"
    strategy = f"group {args.group_size}" if args.group_size else args.strategy
    sym = "symmetric" if args.symmetric else "asymmetric"
    return f"{args.type}{args.num_bits} {strategy} {sym}{' dynamic' if args.dynamic else ''}"


def _sparsity_config(quant: dict, where: str) -> dict | None:
    from compressed_tensors.config import SparsityCompressionConfig

    sparsity = quant.get("sparsity_config") or None
    if sparsity is None:
        return None
    fmt = sparsity.get("format")
    if fmt not in SPARSITY_FORMATS:
        raise ArtifactError(f"{where}.sparsity_config: format {fmt!r} is not supported; supported: {SUPPORTED}")
    try:
        config = SparsityCompressionConfig.load_from_registry(fmt, **sparsity)
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{where}.sparsity_config is not valid ({str(exc).splitlines()[0]})") from exc
    return {"format": fmt, "targets": list(config.targets or ["Linear"]), "ignore": list(config.ignore or [])}


def _files(path: Path) -> dict[str, dict]:
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ArtifactError(f"{index}: not a safetensors index ({exc})") from exc
    elif (path / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise ArtifactError(f"{path}: no model.safetensors or {INDEX} (compressed-tensors checkpoints are safetensors)")
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise ArtifactError(f"{path / missing[0]}: listed in {INDEX} but missing")
    return {name: {"bytes": (path / name).stat().st_size} for name in names}


def as_artifact_tensors(tensors: dict, manifest: dict) -> dict:
    """The checkpoint's tensors (name -> (file, tensor)) as our artifact stores them: packed linears with bf16 or
    int8 values, int8 weights with float32 per-channel scales, every other tensor unchanged. Fills the manifest's
    `layers` (and `lm_head` when the head is int8)."""
    info = manifest["compressed_tensors"]
    weights_only = info["activations"] == "none"
    out = dict(tensors)
    if (info["sparsity"] or {}).get("format") == "sparse-24-bitmask":
        _with_row_offsets(out)
    records = []
    for prefix in sorted({n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in PACKED_KEYS}):
        records.append(_packed_linear(out, prefix, weights_only))
    for name in sorted(n for n, (_, t) in tensors.items() if _decoder_weight(n, t)):
        prefix = name.removesuffix(".weight")
        records.append(_dense_linear(out, prefix, _sparse_target(prefix, info["sparsity"]), weights_only))
    for name in [n for n, (_, t) in out.items() if n.endswith(".weight") and t.dtype == torch.int8]:
        if weights_only:  # an int8 head beside the decoder linears
            _dequantize_in_place(out, name.removesuffix(".weight"))
        elif not _decoder_weight(name, out[name][1]):
            manifest["lm_head"] = {"name": name.removesuffix(".weight"), "kind": "dense", "dtype": "int8"}
    for name in [n for n in out if n.endswith(".weight_scale")]:
        _float_scale(out, name.removesuffix(".weight_scale"))
    if weights_only and any(t.dtype == torch.int8 for _, t in tensors.values()):
        warnings.warn(
            "compressed-tensors checkpoint with int8 weights and unquantized activations (W8A16): its int8 linears "
            "are dequantized to bf16 and run on the dense bf16 kernel",
            stacklevel=5,
        )
    manifest["layers"] = [r.to_dict() for r in records]
    return out


def _with_row_offsets(out: dict) -> None:
    """sparse-24-bitmask linears (compressed [rows, cols / 2], shape [2, 1]) in the sparse-bitmask layout: values
    flat, shape [2], and the row offsets every row's half implies (the reader then checks them against the
    bitmask's popcounts)."""
    for name in [n for n in out if n.endswith(".compressed")]:
        prefix = name.removesuffix(".compressed")
        file, values = out[name]
        if values.dim() != 2 or f"{prefix}.row_offsets" in out:
            raise ArtifactError(
                f"{file}: tensor {name} must be [rows, cols / 2] in the sparse-24-bitmask format, got "
                f"{list(values.shape)}{' beside row_offsets' if f'{prefix}.row_offsets' in out else ''}"
            )
        rows, per_row = values.shape
        out[name] = (file, values.reshape(-1))
        out[f"{prefix}.row_offsets"] = (file, torch.arange(rows, dtype=torch.int64) * per_row)
        if f"{prefix}.shape" in out:
            shape_file, shape = out[f"{prefix}.shape"]
            out[f"{prefix}.shape"] = (shape_file, shape.reshape(-1))


def _decoder_weight(name: str, tensor: torch.Tensor) -> bool:
    return ".layers." in name and name.endswith(".weight") and tensor.dim() == 2


def _sparse_target(prefix: str, sparsity: dict | None) -> bool:
    """Whether the sparsity_config (dense format: zeros stored in place) names this linear."""
    from compressed_tensors.utils.match import match_name

    if sparsity is None or sparsity["format"] != "dense":
        return False
    if any(match_name(prefix, target) for target in sparsity["ignore"]):
        return False
    return any(target == "Linear" or match_name(prefix, target) for target in sparsity["targets"])


def _packed_linear(out: dict, prefix: str, weights_only: bool) -> LayerRecord:
    file, values = out[f"{prefix}.compressed"]
    if values.dtype == torch.int8 and weights_only:
        raise ArtifactError(
            f"{file}: tensor {prefix}.compressed: int8 bitmaps with unquantized activations (W8A16) are not "
            f"supported; supported: {SUPPORTED}"
        )
    if values.is_floating_point() and values.dtype != torch.bfloat16:
        out[f"{prefix}.compressed"] = (file, values.to(torch.bfloat16))
    rows, cols = (int(v) for v in out[f"{prefix}.shape"][1])
    dtype = "int8" if values.dtype == torch.int8 else "bfloat16"
    return LayerRecord(prefix, (rows, cols), 0.0, values.numel(), "bitmap", dtype)


def _dense_linear(out: dict, prefix: str, sparse: bool, weights_only: bool) -> LayerRecord:
    """The record of a linear stored as a whole weight; packed in `out` when it is a sparsity target and sparse
    enough for the bitmap kernels (storage_kind, the rule our writer applies)."""
    file, weight = out[f"{prefix}.weight"]
    if weight.dtype == torch.int8 and weights_only:
        weight = _dequantize_in_place(out, prefix)
    elif weight.is_floating_point() and weight.dtype != torch.bfloat16:
        weight = weight.to(torch.bfloat16)
        out[f"{prefix}.weight"] = (file, weight)
    dtype = "int8" if weight.dtype == torch.int8 else "bfloat16"
    nnz = int(torch.count_nonzero(weight)) if sparse else weight.numel()
    record = LayerRecord(prefix, tuple(weight.shape), 0.0, nnz).stored_as(dtype)
    if record.kind == "bitmap":
        del out[f"{prefix}.weight"]
        shape = torch.tensor(list(weight.shape), dtype=torch.int64)
        for key, tensor in zip(PACKED_KEYS, (shape, *pack_reference(weight)), strict=True):
            out[f"{prefix}.{key}"] = (file, tensor)
    return record


def _float_scale(out: dict, prefix: str) -> None:
    """An int8 weight's scale as float32 (checkpoints store it in the model's dtype); a zero point is refused."""
    if f"{prefix}.weight_zero_point" in out:
        file = out[f"{prefix}.weight_zero_point"][0]
        raise ArtifactError(
            f"{file}: tensor {prefix}.weight_zero_point: asymmetric int8 weights are not supported; "
            f"supported: {SUPPORTED}"
        )
    entry = out.get(f"{prefix}.weight_scale")
    if entry is not None and entry[1].is_floating_point():
        out[f"{prefix}.weight_scale"] = (entry[0], entry[1].float())


def _dequantize_in_place(out: dict, prefix: str) -> torch.Tensor:
    file, q = out[f"{prefix}.weight"]
    entry = out.pop(f"{prefix}.weight_scale", None)
    if entry is None:
        raise ArtifactError(f"{file}: tensor {prefix}.weight_scale is missing ({prefix} has int8 values)")
    weight = dequantize(q, entry[1]).to(torch.bfloat16)
    out[f"{prefix}.weight"] = (file, weight)
    return weight
