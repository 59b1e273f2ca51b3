"""What an artifact holds, per layer, read from its safetensors headers (no tensor data is loaded)."""

from pathlib import Path

from safetensors import safe_open

from ..pipeline.artifact import PACKED_KEYS, read_manifest

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


def tensor_bytes(path: Path, manifest: dict) -> dict[str, int]:
    sizes = {}
    for filename in manifest["files"]:
        with safe_open(path / filename, framework="pt") as fh:
            for name in fh.keys():
                piece = fh.get_slice(name)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                sizes[name] = count * _DTYPE_BYTES[piece.get_dtype()]
    return sizes


def artifact_table(path: str | Path) -> tuple[list[dict], dict]:
    path = Path(path)
    manifest = read_manifest(path)
    sizes = tensor_bytes(path, manifest)
    rows = []
    for layer in manifest["layers"]:
        name = layer["name"]
        if layer["kind"] == "bitmap":
            nbytes = sum(sizes.get(f"{name}.{key}", 0) for key in PACKED_KEYS)
        else:
            nbytes = sizes.get(f"{name}.weight", 0)
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
        "recipe": manifest["recipe"]["name"],
    }
    return rows, totals
