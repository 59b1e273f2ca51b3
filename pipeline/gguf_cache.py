"""A GGUF model read once: transformers dequantizes a GGUF on every load (~18 s for SmolLM2-135M: config, tokenizer
and weights each parse the file), so a small GGUF is converted once into an ordinary model directory (fp32
safetensors, config, tokenizer) in the user cache, which then loads in well under a second with the same tensors."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

# A Q4 GGUF grows ~8x as fp32 safetensors: past this file size the copy would cost more disk than the load it saves.
GGUF_CACHE_MAX_BYTES = 512 * 2**20


def cache_dir() -> Path:
    """$SPARAMX_CACHE, else $XDG_CACHE_HOME/sparamx (~/.cache/sparamx)."""
    if os.environ.get("SPARAMX_CACHE"):
        return Path(os.environ["SPARAMX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparamx"


def converted_directory(gguf: Path) -> Path | None:
    """The cached model directory converted from `gguf` (made now when missing), or None for a GGUF too large to copy.
    Keyed by path, size and modification time, so a replaced file is converted afresh."""
    gguf = gguf.resolve()
    info = gguf.stat()
    if info.st_size > GGUF_CACHE_MAX_BYTES:
        return None
    key = hashlib.sha256(f"{gguf}\0{info.st_size}\0{info.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if not (out / "config.json").is_file():
        _convert(gguf, out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    """Write the directory beside its final place and rename it there: a crash leaves no half-made model, and of two
    processes converting at once the second finds the first's directory and drops its own."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, config=config, dtype=torch.float32, low_cpu_mem_usage=True
        )
        del model.config.quantization_config  # the weights below are the dequantized dense ones
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
