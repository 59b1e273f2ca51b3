"""The stage runner, `sparamx.compress`: resolve -> calibrate -> prune -> smooth -> quantize -> pack -> write.

Each stage is a function of what the ones before it made; the calibrated ones (Wanda, SmoothQuant, GPTQ) share one
block walk (layerwise.BlockWalk). Nothing here does a stage's math.
"""

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from .artifact_format import LayerRecord, new_manifest
from .artifact_writer import artifact_state_dict, save_config, write_artifact
from .errors import ArtifactError
from .layerwise import prune_layerwise
from .models import ModelSource, load_config, load_model, load_tokenizer, output_linear_name, resolve_model
from .quantizing import Quantized, quantize_weights
from .recipe import DEFAULT_RECIPE, QuantizeConfig, Recipe, load_recipe
from .smoothing import smooth_layerwise
from .textdata import calibration_windows, load_documents


@dataclass
class Calibration:
    """The calibrate stage's output: token windows for the calibrated stages (None when none runs) and what the
    manifest says of them."""

    windows: list[torch.Tensor] | None = None
    info: dict | None = None


class Timings(dict):
    """Seconds per stage, for the report: `with timings("prune_s"): ...`."""

    @contextlib.contextmanager
    def __call__(self, key: str):
        start = time.perf_counter()
        yield
        self[key] = time.perf_counter() - start


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
    timings = Timings()
    with timings("prepare_s"):
        tokenizer = load_tokenizer(source)
        calibration = calibrate(recipe, config, tokenizer, calib)
    with timings("load_s"):
        llm = load_model(source, config)
    with timings("prune_s"):
        records = prune_layerwise(llm, recipe.prune, calibration.windows, progress=progress)
    head = output_linear_name(llm) if recipe.quantize.lm_head else None
    with timings("smooth_s"):
        smoothing = smooth(llm, recipe.quantize, calibration.windows, head, progress)
    with timings("quantize_s"):
        quantized = quantize(llm, records, head, recipe.quantize, calibration.windows, progress)
    with timings("write_s"):
        records = pack(records, recipe.quantize)
        tensors = artifact_state_dict(llm, layouts(records, head), quantized)
        manifest = new_manifest(
            source.to_dict(),
            recipe.to_dict(),
            calibration.info,
            records,
            smoothing,
            head,
            recipe.kv.to_dict(),
            {"sparamx": __version__, "torch": torch.__version__},
        )
        structure = recipe.prune.pattern if recipe.prune.nm else "unstructured"
        config = save_config(llm, records, structure, head)
        write_artifact(out, config, llm.generation_config, tokenizer, tensors, manifest, overwrite=overwrite)
    return report(out, source, recipe, records, timings)


def calibrate(recipe: Recipe, config, tokenizer, calib: str | Path | None) -> Calibration:
    """Token windows from the recipe's calibration text (or `calib`), when a stage of the recipe needs them."""
    if not recipe.needs_calibration:
        return Calibration()
    cal = recipe.calibration
    seqlen = min(cal.seqlen, getattr(config, "max_position_embeddings", cal.seqlen) or cal.seqlen)
    windows = calibration_windows(tokenizer, load_documents(cal.dataset, calib), cal.nsamples, seqlen, cal.seed)
    return Calibration(windows, {"dataset": str(calib or cal.dataset), "nsamples": len(windows), "seqlen": seqlen})


def smooth(llm, config: QuantizeConfig, windows, head: str | None, progress: bool) -> list[dict] | None:
    """SmoothQuant's folds, when the recipe asks for them; one record per fold."""
    if config.smoothquant is None:
        return None
    return smooth_layerwise(llm, windows, config.smoothquant, progress=progress, head=head)


def quantize(llm, records: list[LayerRecord], head: str | None, config: QuantizeConfig, windows, progress) -> Quantized:
    """INT8 values and scales of the decoder linears (and the head, when named), when the recipe asks for int8."""
    if config.weights != "int8":
        return {}
    names = [r.name for r in records] + ([head] if head else [])
    return quantize_weights(llm, names, config, windows, progress=progress)


def pack(records: list[LayerRecord], config: QuantizeConfig) -> list[LayerRecord]:
    """Decide, once, how each linear is stored, which is how it runs: bitmap or dense, bf16 or int8."""
    return [r.stored_as("int8" if config.weights == "int8" else "bfloat16") for r in records]


def layouts(records: list[LayerRecord], head: str | None) -> dict[str, tuple[str, str]]:
    out = {r.name: (r.kind, r.dtype) for r in records}
    if head:
        out[head] = ("dense", "int8")
    return out


def report(out: Path, source: ModelSource, recipe: Recipe, records: list[LayerRecord], timings: Timings) -> dict:
    total = sum(r.shape[0] * r.shape[1] for r in records)
    return {
        "out": str(out),
        "model": source.name,
        "recipe": recipe.name,
        "linears": len(records),
        "packed": sum(r.kind == "bitmap" for r in records),
        "sparsity": 1.0 - sum(r.nnz for r in records) / total,
        "weights": records[0].dtype if records else "bfloat16",
        "timings": dict(timings),
    }
