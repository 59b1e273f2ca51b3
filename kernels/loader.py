"""sparamx.load: rebuild a transformers model from an artifact, every packed linear reconstructed by the C++ op."""

from pathlib import Path

import torch

from ..pipeline.artifact import dense_tensors, read_manifest, read_tensors
from ..pipeline.errors import ArtifactError
from . import ops


def load(path: str | Path, dtype: torch.dtype = torch.bfloat16, verify: bool = True):
    """Load the artifact at `path` -> (model, tokenizer). `verify` checks each file's sha256 first."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    tensors = read_tensors(path, manifest, verify=verify)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path / 'config.json'}: cannot be read ({str(exc).splitlines()[0]})") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # describes the files; the model we build holds dense tensors
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dense_tensors(tensors, ops.bitmap_unpack)

    expected = model.state_dict()
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
    model.eval()
    model.sparamx_manifest = manifest
    return model, AutoTokenizer.from_pretrained(path)
