"""Artifact format v1: write atomically, read back with every tensor checked (see ARCHITECTURE.md).

Directory: config.json (+ compressed-tensors quantization_config), generation_config.json, tokenizer files,
model.safetensors (or shards + index), sparamx.json (manifest with a sha256 per safetensors file). No pickle.
"""

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ArtifactError
from .quantize import dequantize

FORMAT = "sparamx-artifact"
VERSION = "1.0"
MANIFEST = "sparamx.json"
VALUE_BYTES = {"bfloat16": 2, "int8": 1}
PACKED_KEYS = ("shape", "compressed", "bitmask", "row_offsets")
MAX_SHARD = "5GB"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def compression_config(records: list[dict], structure: str, int8_head: str | None = None) -> dict:
    """The compressed-tensors style quantization_config that config.json carries. `int8_head` names the output linear
    when it is stored as int8 too (it is never sparse)."""
    total = sum(r["shape"][0] * r["shape"][1] for r in records)
    nonzero = sum(r["nnz"] for r in records)
    int8 = sorted(r["name"] for r in records if r["dtype"] == "int8") + ([int8_head] if int8_head else [])
    config = {
        "quant_method": "compressed-tensors",
        "format": "sparse-bitmask",
        "quantization_status": "compressed",
        "config_groups": {},
        "sparsity_config": {
            "format": "sparse-bitmask",
            "global_sparsity": 1.0 - nonzero / total if total else 0.0,
            "sparsity_structure": structure,
            "targets": ["Linear"],
            "ignore": ["lm_head", *sorted(r["name"] for r in records if r["kind"] != "bitmap")],
            "registry_requires_subclass": False,
        },
    }
    if int8:
        config["format"] = "int-quantized"
        config["ignore"] = [] if int8_head else ["lm_head"]
        config["config_groups"] = {
            "group_0": {
                "targets": int8,
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
                "input_activations": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": False,
                    "strategy": "token",
                    "dynamic": True,
                },
            }
        }
    return config


def packed_bytes(rows: int, cols: int, nnz: int, dtype: str) -> int:
    """Bytes of one linear in the bitmap format: values, bitmask, row_offsets."""
    return nnz * VALUE_BYTES[dtype] + rows * ((cols + 7) // 8) + rows * 8


def storage_kind(rows: int, cols: int, nnz: int, dtype: str) -> str:
    """bitmap when it is fewer bytes than the dense weight, else dense (a 5%-sparse layer is not worth a bitmap)."""
    return "bitmap" if packed_bytes(rows, cols, nnz, dtype) < rows * cols * VALUE_BYTES[dtype] else "dense"


def artifact_state_dict(
    model, layouts: dict[str, tuple[str, str]], pack: Callable, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Tensors to store. layouts maps a linear's name to (kind, dtype): kind bitmap -> P.shape/compressed/bitmask/
    row_offsets, dense -> P.weight; dtype int8 -> the values and per-channel scales the quantize stage chose
    (`quantized[name]`), stored as P.weight int8 / P.compressed and P.weight_scale [out, 1] float32. The model's own
    float weight gives the pruning mask. Everything else is stored in bf16. A tensor sharing storage with one already
    stored (tied lm_head) is left out, and the loader re-ties it, unless layouts names it: then it is stored as its
    own copy.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple]] = set()
    for name, tensor in model.state_dict().items():
        prefix = name.removesuffix(".weight")
        layout = name.endswith(".weight") and prefix in layouts
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if not layout and key in seen:
            continue
        value = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        if not layout:
            seen.add(key)
            out[name] = value.contiguous()
            continue
        kind, dtype = layouts[prefix]
        stored = value.contiguous()
        if dtype == "int8":
            if prefix not in quantized:
                raise ValueError(f"{prefix}: its layout says int8, but the quantize stage did not quantize it")
            stored, scale = quantized[prefix]
            out[f"{prefix}.weight_scale"] = scale.reshape(-1, 1).contiguous()
        if kind == "bitmap":
            compressed, bitmask, row_offsets = pack(value.contiguous())
            out[f"{prefix}.shape"] = torch.tensor(list(value.shape), dtype=torch.int64)
            # The pruning mask decides what is stored: an int8 value that rounded to 0 is kept as a 0.
            out[f"{prefix}.compressed"] = stored[value != 0] if dtype == "int8" else compressed
            out[f"{prefix}.bitmask"] = bitmask
            out[f"{prefix}.row_offsets"] = row_offsets
        else:
            out[name] = stored
    return out


def write_artifact(
    out: str | Path, config, generation_config, tokenizer, tensors: dict, manifest: dict, overwrite: bool = False
) -> Path:
    """Write everything into a temporary sibling, then rename it into place: a failure leaves no artifact behind."""
    from huggingface_hub import split_torch_state_dict_into_shards

    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary directory
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=MAX_SHARD
        )
        files = {}
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, tmp / filename, metadata={"format": "pt"})
            (tmp / filename).chmod(0o666 & ~umask)
            files[filename] = {"sha256": sha256_file(tmp / filename), "bytes": (tmp / filename).stat().st_size}
        if split.is_sharded:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                "weight_map": split.tensor_to_filename,
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        manifest = {"format": FORMAT, "format_version": VERSION, **manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "artifact")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_config(model, records: list[dict], structure: str, int8_head: str | None = None):
    """A copy of the model's config that says what was done (compressed-tensors sparse-bitmask, stored in bf16).
    An int8 lm_head is stored apart from the bf16 embeddings, so the config no longer ties them."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # a GGUF-derived config lacks it; other tools look for it
    config.quantization_config = compression_config(records, structure, int8_head)
    if int8_head:
        config.tie_word_embeddings = False
    config.dtype = torch.bfloat16
    return config


def write_text_atomic(path: str | Path, text: str, mode: int = 0o644) -> None:
    """Write a text file through a temporary sibling renamed over it: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_manifest(path: str | Path, **fields) -> dict:
    """Set top-level fields of an artifact's sparamx.json (e.g. eval results), atomically."""
    path = Path(path)
    manifest = read_manifest(path)
    manifest.update(fields)
    write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=2), (path / MANIFEST).stat().st_mode & 0o777)
    return manifest


def cache_dir() -> Path:
    """$SPARAMX_CACHE, else $XDG_CACHE_HOME/sparamx (~/.cache/sparamx)."""
    if os.environ.get("SPARAMX_CACHE"):
        return Path(os.environ["SPARAMX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparamx"


def remember_artifact(path: str | Path) -> None:
    """Record the artifact `sparamx prune` wrote last (`sparamx eval` with no PATH evaluates it)."""
    write_text_atomic(cache_dir() / "last-artifact", str(Path(path).resolve()) + "\n")


def last_artifact() -> Path:
    file = cache_dir() / "last-artifact"
    if not file.is_file():
        raise ArtifactError("no artifact given and none made yet: run `make prune` first or pass an artifact directory")
    return Path(file.read_text().strip())


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact directory not found")
    if not file.is_file():
        raise ArtifactError(f"{path}: not a sparamx artifact (no {MANIFEST})")
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
    """All stored tensors as name -> (file name, tensor); checks each file's sha256 first when `verify`."""
    path = Path(path)
    tensors: dict[str, tuple[str, torch.Tensor]] = {}
    for filename, info in manifest["files"].items():
        file = path / filename
        if not file.is_file():
            raise ArtifactError(f"{file}: listed in {MANIFEST} but missing")
        if verify and sha256_file(file) != info.get("sha256"):
            raise ArtifactError(f"{file}: sha256 does not match {MANIFEST} (truncated or modified file)")
        try:
            with safe_open(file, framework="pt") as fh:
                for name in fh.keys():
                    tensors[name] = (filename, fh.get_tensor(name))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{file}: corrupt safetensors file ({exc})") from exc
    return tensors


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
