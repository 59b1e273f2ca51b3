"""What an artifact holds, per layer, read from its safetensors headers (no tensor data is loaded)."""

import math
from pathlib import Path

from safetensors import safe_open

from ..pipeline.artifact_format import PACKED_KEYS
from ..pipeline.artifact_reader import read_manifest, read_tensors
from ..pipeline.ct_checkpoint import from_checkpoint

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


def tensor_shapes(path: Path, manifest: dict) -> dict[str, tuple[list[int], int]]:
    """Each stored tensor's shape and bytes."""
    shapes = {}
    for filename in manifest["files"]:
        with safe_open(path / filename, framework="pt") as fh:
            for name in fh.keys():
                piece = fh.get_slice(name)
                shape = list(piece.get_shape())
                shapes[name] = (shape, math.prod(shape) * _DTYPE_BYTES[piece.get_dtype()])
    return shapes


def artifact_table(path: str | Path) -> tuple[list[dict], dict]:
    """One row per decoder linear, and totals over them (totals["lm_head"]: the int8 lm_head's row, if stored so)."""
    path = Path(path)
    manifest = read_manifest(path)
    if from_checkpoint(manifest):  # a compressed-tensors checkpoint: its layers are known once it is read
        read_tensors(path, manifest, verify=False)
    shapes = tensor_shapes(path, manifest)
    sizes = {name: nbytes for name, (_, nbytes) in shapes.items()}
    rows = []
    for layer in manifest["layers"]:
        name = layer["name"]
        # as stored: a compressed-tensors checkpoint may hold whole weights that load as bitmaps
        nbytes = sum(sizes.get(f"{name}.{key}", 0) for key in PACKED_KEYS) or sizes.get(f"{name}.weight", 0)
        params = layer["shape"][0] * layer["shape"][1]
        rows.append({**layer, "bytes": nbytes, "bits_per_weight": 8 * nbytes / params if params else 0.0})
    params = sum(r["shape"][0] * r["shape"][1] for r in rows)
    nnz = sum(r["nnz"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    totals = {
        "params": params,
        "nnz": nnz,
        "bytes": nbytes,
        "sparsity": 1.0 - nnz / params if params else 0.0,
        "bits_per_weight": 8 * nbytes / params if params else 0.0,
        "files": len(manifest["files"]),
        "files_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "source": manifest["source_model"]["name"],
        "recipe": manifest["recipe"]["name"] if manifest["recipe"] else manifest.get("source_format"),
        "lm_head": None,
    }
    head = manifest.get("lm_head")
    if head:
        shape, nbytes = shapes[f"{head['name']}.weight"]
        params = math.prod(shape)
        totals["lm_head"] = {
            **head,
            "shape": shape,
            "sparsity": 0.0,
            "nnz": params,
            "bytes": nbytes,
            "bits_per_weight": 8 * nbytes / params,
        }
    return rows, totals
