"""The stage runner: model -> calibrate -> prune -> quantize + pack -> write artifact. `sparamx.compress` is this."""

import datetime
import platform
import time
from pathlib import Path

import torch

from .. import __version__
from .artifact import artifact_state_dict, save_config, storage_kind, write_artifact
from .errors import ArtifactError
from .layerwise import prune_layerwise
from .models import load_config, load_model, load_tokenizer, output_linear_name, resolve_model
from .quantizing import quantize_weights
from .recipe import DEFAULT_RECIPE, Recipe, load_recipe
from .smoothing import smooth_layerwise
from .textdata import calibration_windows, load_documents


def default_out(model: str, recipe: Recipe) -> Path:
    stem = Path(model).stem if model.endswith(".gguf") or "/" in model else model
    return Path("artifacts") / f"{stem.replace('/', '--')}-{recipe.name}"


def compress(
    model: str | None = None,
    recipe: str | Path | Recipe = DEFAULT_RECIPE,
    out: str | Path | None = None,
    calib: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Compress `model` with `recipe` into the artifact directory `out`; returns a report (also in sparamx.json)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    source = resolve_model(model)
    out = Path(out) if out else default_out(source.name, recipe)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out}: already exists (pass --overwrite to replace it)")
    config = load_config(source)  # architecture checked before any weight is read
    timings = {}
    start = time.perf_counter()

    tokenizer = load_tokenizer(source)
    windows, calibration = None, None
    if recipe.needs_calibration:
        cal = recipe.calibration
        seqlen = min(cal.seqlen, getattr(config, "max_position_embeddings", cal.seqlen) or cal.seqlen)
        documents = load_documents(cal.dataset, calib)
        windows = calibration_windows(tokenizer, documents, cal.nsamples, seqlen, cal.seed)
        calibration = {"dataset": str(calib or cal.dataset), "nsamples": len(windows), "seqlen": seqlen}
    timings["prepare_s"] = time.perf_counter() - start

    start = time.perf_counter()
    llm = load_model(source, config)
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    records = prune_layerwise(llm, recipe.prune, windows, progress=progress)
    timings["prune_s"] = time.perf_counter() - start
    head = output_linear_name(llm) if recipe.quantize.lm_head else None
    smoothing = None
    if recipe.quantize.smoothquant is not None:
        start = time.perf_counter()
        smoothing = smooth_layerwise(llm, windows, recipe.quantize.smoothquant, progress=progress, head=head)
        timings["smooth_s"] = time.perf_counter() - start

    dtype = "int8" if recipe.quantize.weights == "int8" else "bfloat16"
    quantized = {}
    if dtype == "int8":
        start = time.perf_counter()
        names = [r["name"] for r in records] + ([head] if head else [])
        quantized = quantize_weights(llm, names, recipe.quantize, windows, progress=progress)
        timings["quantize_s"] = time.perf_counter() - start

    start = time.perf_counter()
    from ..kernels.ops import bitmap_pack

    for record in records:
        record["kind"] = storage_kind(*record["shape"], record["nnz"], dtype)
        record["dtype"] = dtype
    packed = {r["name"] for r in records if r["kind"] == "bitmap"}
    layouts = {r["name"]: (r["kind"], r["dtype"]) for r in records}
    if head:
        layouts[head] = ("dense", "int8")
    tensors = artifact_state_dict(llm, layouts, bitmap_pack, quantized)
    structure = recipe.prune.pattern if recipe.prune.nm else "unstructured"
    manifest = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "created_by": {"sparamx": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "source_model": source.to_dict(),
        "recipe": recipe.to_dict(),
        "calibration": calibration,
        "layers": records,
        "smoothquant": smoothing,
        "lm_head": {"name": head, "kind": "dense", "dtype": "int8"} if head else None,
        "kv_sparsity": None,
        "eval": None,
    }
    write_artifact(
        out,
        save_config(llm, records, structure, head),
        llm.generation_config,
        tokenizer,
        tensors,
        manifest,
        overwrite=overwrite,
    )
    timings["write_s"] = time.perf_counter() - start

    total = sum(r["shape"][0] * r["shape"][1] for r in records)
    return {
        "out": str(out),
        "model": source.name,
        "recipe": recipe.name,
        "linears": len(records),
        "packed": len(packed),
        "sparsity": 1.0 - sum(r["nnz"] for r in records) / total,
        "weights": dtype,
        "timings": timings,
    }
