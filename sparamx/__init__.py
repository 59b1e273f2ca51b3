"""SparAMX: compress Hugging Face causal LMs (pruning, bitmap packing) and run them on our CPU kernels.

model, tokenizer = sparamx.load("artifacts/smollm2-135m-wanda-50")
report = sparamx.compress("smollm2-135m", recipe="wanda-50", out="artifacts/...")
"""

__version__ = "0.1.0"


def load(
    path,
    dtype=None,
    verify: bool = True,
    kernels: bool | None = None,
    kv_sparsity=None,
    kv_cache=None,
    fused_decode: bool | None = None,
):
    """Load an artifact directory -> (transformers model, tokenizer); packed linears run on our kernels where the CPU
    has AVX2 or better (or kernels=True), else they are unpacked to dense torch weights (or kernels=False).
    On our kernels, generate() runs each new token through all decoder layers in one C++ call, on our KV cache
    (fused_decode=False: module by module, for debugging). kv_sparsity=(k, v) (or an artifact whose recipe asks for
    it) makes that cache sparse; kv_cache=False decodes with transformers' cache and attention instead
    (sparamx.kernels.loader.load has the rules)."""
    import torch

    from .kernels.loader import load as _load

    return _load(
        path,
        dtype=dtype or torch.bfloat16,
        verify=verify,
        kernels=kernels,
        kv_sparsity=kv_sparsity,
        kv_cache=kv_cache,
        fused_decode=fused_decode,
    )


def compress(model=None, recipe="wanda-50", out=None, calib=None, overwrite=False, progress=True):
    """Run a recipe on a model and write the artifact; returns a report dict."""
    from .pipeline.runner import compress as _compress

    return _compress(model, recipe, out=out, calib=calib, overwrite=overwrite, progress=progress)


__all__ = ["load", "compress", "__version__"]
