"""Artifact format v1, the facts both sides agree on: file and tensor names, dtypes, the version, which linears are
stored as bitmaps, the compressed-tensors config and the manifest's schema (see ARCHITECTURE.md).

Directory: config.json (+ compressed-tensors quantization_config), generation_config.json, tokenizer files,
model.safetensors (or shards + index), sparamx.json (the manifest, with a sha256 per safetensors file). No pickle.
The writer (artifact_writer.py) and the reader (artifact_reader.py) import their names from here.
"""

import dataclasses
import datetime
import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

FORMAT = "sparamx-artifact"
VERSION = "1.0"
MANIFEST = "sparamx.json"
VALUE_BYTES = {"bfloat16": 2, "int8": 1}
PACKED_KEYS = ("shape", "compressed", "bitmask", "row_offsets")
MAX_SHARD = "5GB"
# Below these sparsities a linear is stored, and runs, dense: its bitmap would save too few bytes to pay for the
# bitmap kernels' lower streaming efficiency (eval/results/kernels.md, M = 1: bitmap ~85-90% of the read bandwidth,
# dense ~95-100%; the byte counts then cross at ~16% sparsity for bf16 and ~22% for int8).
BITMAP_FROM = {"bfloat16": 0.2, "int8": 0.25}


@dataclass(frozen=True)
class LayerRecord:
    """One decoder linear as the manifest lists it: what pruning left (nnz) and how it is stored, hence how it runs
    (kind: bitmap -> the bitmap kernels, dense -> the dense ones; dtype: bfloat16 | int8)."""

    name: str
    shape: tuple[int, int]
    target: float  # the sparsity the recipe asked for
    nnz: int
    kind: str = "dense"
    dtype: str = "bfloat16"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    def stored_as(self, dtype: str) -> "LayerRecord":
        """This record with its storage decided for values of `dtype` (storage_kind's rule)."""
        return dataclasses.replace(self, dtype=dtype, kind=storage_kind(*self.shape, self.nnz, dtype))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "shape": list(self.shape), "sparsity": self.sparsity}

    @classmethod
    def from_dict(cls, data: dict) -> "LayerRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "shape" else v) for k, v in data.items() if k in fields})


def packed_bytes(rows: int, cols: int, nnz: int, dtype: str) -> int:
    """Bytes of one linear in the bitmap format: values, bitmask, row_offsets."""
    return nnz * VALUE_BYTES[dtype] + rows * ((cols + 7) // 8) + rows * 8


def storage_kind(rows: int, cols: int, nnz: int, dtype: str) -> str:
    """bitmap when the linear is sparse enough for the bitmap kernels to beat the dense ones (BITMAP_FROM) and the
    bitmap is fewer bytes than the dense weight, else dense. Decided once, at write time; the loader runs it."""
    sparse_enough = 1.0 - nnz / max(1, rows * cols) >= BITMAP_FROM[dtype]
    fewer_bytes = packed_bytes(rows, cols, nnz, dtype) < rows * cols * VALUE_BYTES[dtype]
    return "bitmap" if sparse_enough and fewer_bytes else "dense"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def compression_config(records: list[LayerRecord], structure: str, int8_head: str | None = None) -> dict:
    """The compressed-tensors style quantization_config that config.json carries. `int8_head` names the output linear
    when it is stored as int8 too (it is never sparse)."""
    total = sum(r.shape[0] * r.shape[1] for r in records)
    nonzero = sum(r.nnz for r in records)
    int8 = sorted(r.name for r in records if r.dtype == "int8") + ([int8_head] if int8_head else [])
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
            "ignore": ["lm_head", *sorted(r.name for r in records if r.kind != "bitmap")],
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


def new_manifest(
    source: dict,
    recipe: dict,
    calibration: dict | None,
    layers: list[LayerRecord],
    smoothquant: list[dict] | None,
    int8_head: str | None,
    kv: dict,
    versions: dict[str, str],
) -> dict:
    """sparamx.json's fields as the writer sets them (it adds format, format_version and files); `eval` is filled by
    `sparamx eval`. `kv_sparsity`: the recipe's kv settings, which sparamx.load applies unless told otherwise."""
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "created_by": {**versions, "python": platform.python_version()},
        "source_model": source,
        "recipe": recipe,
        "calibration": calibration,
        "layers": [r.to_dict() for r in layers],
        "smoothquant": smoothquant,
        "lm_head": {"name": int8_head, "kind": "dense", "dtype": "int8"} if int8_head else None,
        "kv_sparsity": kv,
        "eval": None,
    }
