"""Artifact writer: the tensors to store, the config that describes them, and writes that are atomic (a failure
leaves no artifact, and a reader sees an old file or a new one, never half of one). The format is artifact_format's.
"""

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .artifact_format import FORMAT, MANIFEST, MAX_SHARD, VERSION, LayerRecord, compression_config, sha256_file
from .artifact_reader import read_manifest
from .bitmap import pack_reference
from .errors import ArtifactError


def artifact_state_dict(
    model, layouts: dict[str, tuple[str, str]], quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]
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
            compressed, bitmask, row_offsets = pack_reference(value.contiguous())
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


def save_config(model, records: list[LayerRecord], structure: str, int8_head: str | None = None):
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
