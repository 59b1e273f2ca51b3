"""The llama.cpp peer of the decode benchmark, through llama-cpp-python (the optional `bench` extra,
`make install-bench`): SmolLM2-135M from the same GGUF at its shipped Q4_1 and requantized to Q8_0, batch 1, the same
random prompt, token count and thread count as our runs.

The peer is built with -DGGML_NATIVE=OFF, the AVX-512 options as the CPU has them and the AMX ones off: llama.cpp's
AMX path crashed on this model here (a segfault in ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36 built natively).
"""

import ctypes
import importlib.util
import os
import time
from pathlib import Path

PEERS = {"llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_1": "Q4_1"}
MODELS = ("smollm2-135m",)  # the models that ship a GGUF
_FTYPES = {"Q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def describe() -> str:
    """One line for the report: which llama.cpp ran, and how it was built."""
    from importlib.metadata import version

    return (
        f"llama.cpp peer: llama-cpp-python {version('llama-cpp-python')}, built with -DGGML_NATIVE=OFF and AMX off "
        "(its AMX path crashed on this model), batch 1 only; Q8_0 is the shipped Q4_1 GGUF requantized."
    )


def gguf_for(model: str, quant: str, cache: Path, threads: int) -> str:
    """The GGUF the peer runs: the shipped file for its own quantization, else a requantized copy under `cache`."""
    from ..pipeline.models import resolve_model

    source = resolve_model(model)
    shipped = Path(source.location) / source.gguf_file
    if quant in shipped.name:
        return str(shipped)
    out = cache / f"{shipped.stem.rsplit('.', 1)[0]}.{quant}.gguf"
    if not out.is_file():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = _FTYPES[quant]
        params.allow_requantize = True  # from Q4_1: the same values in Q8_0 blocks; the layout is what is timed
        params.nthread = threads
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(shipped).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"llama.cpp could not requantize {shipped} to {quant}")
        os.replace(tmp, out)
    return str(out)


def time_generate(spec: dict) -> tuple[float, list[float]]:
    """bench_decode.time_generate for the peer, in this (fresh) process: load seconds, then [prefill + first token,
    each later token] seconds of one greedy generate."""
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(
        model_path=spec["artifact"],
        n_ctx=spec["prompt"] + spec["new_tokens"] + 32,
        n_batch=max(512, spec["prompt"]),
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
    )
    load_s = time.perf_counter() - start
    ids = list(spec.pop("prompt_ids"))  # the prompt our runs get, drawn by the parent: no torch in this process

    def run(new_tokens, prompt):
        llm.reset()  # no reuse of the last run's KV cache
        times, begin = [], time.perf_counter()
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # never stops by itself (no EOS check)
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        return [times[0] - begin] + [b - a for a, b in zip(times, times[1:], strict=False)]

    run(2, ids[:16])
    return load_s, run(spec["new_tokens"], ids)
