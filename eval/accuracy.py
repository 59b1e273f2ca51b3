"""`sparamx eval`: an artifact (on our kernels) against its dense source model, with lm-eval, and the recipe's gate.

The comparison goes into the artifact's sparamx.json ("eval") and eval/results/eval-<artifact>.{json,md}.
Recovery is compressed / dense for scores where higher is better and dense / compressed for perplexities, so 1.0
always means "nothing lost".
"""

import datetime
import functools
import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipeline.artifact_reader import read_manifest
from ..pipeline.artifact_writer import update_manifest, write_text_atomic
from ..pipeline.ct_checkpoint import from_checkpoint
from ..pipeline.errors import SparamxError
from ..pipeline.models import ModelSource, load_model, load_tokenizer
from ..pipeline.recipe import Recipe
from ..user_cache import cache_dir, last_artifact
from .harness import MAX_LENGTH, default_tasks, evaluate

# Metrics shown in the table and checked by a gate; lm-eval's other outputs (byte perplexity, ...) stay in the JSON.
REPORTED = ("acc", "acc_norm", "word_perplexity")


class GateError(SparamxError):
    """A metric recovered less than the recipe's eval.recovery_threshold."""


def comparison(dense: dict, compressed: dict) -> list[dict]:
    """One row per (task, metric) shown: both values and the recovery."""
    rows = []
    for task, result in compressed.items():
        for metric in REPORTED:
            if metric not in result["metrics"]:
                continue
            ours = result["metrics"][metric]
            row = {"task": task, "metric": metric, "compressed": ours["value"], "samples": result["samples"]}
            row["higher_is_better"] = ours["higher_is_better"]
            base = dense.get(task, {}).get("metrics", {}).get(metric) if dense else None
            row["dense"] = base["value"] if base else None
            row["recovery"] = recovery(row["dense"], ours["value"], ours["higher_is_better"]) if base else None
            rows.append(row)
    return rows


def recovery(dense: float, compressed: float, higher_is_better: bool) -> float:
    if higher_is_better:
        return compressed / dense if dense > 0 else float(compressed >= dense)
    return dense / compressed if compressed > 0 else 1.0


def gate_failures(rows: list[dict], tasks: list[str], threshold: float | None) -> list[str]:
    """A line per gated metric below the threshold (every reported metric of `tasks`)."""
    if threshold is None:
        return []
    return [
        f"{r['task']} {r['metric']}: {100 * r['recovery']:.1f}% of dense "
        f"({r['compressed']:.4g} vs {r['dense']:.4g}) < {100 * threshold:.1f}%"
        for r in rows
        if r["task"] in tasks and r["recovery"] is not None and r["recovery"] < threshold
    ]


def markdown(report: dict) -> str:
    lines = [
        f"# Accuracy: {report['artifact']} vs its dense source ({report['source']})",
        "",
        f"lm-eval {report['lm_eval']}, {report['limit_text']}, fp32 activations; compressed model on the sparamx "
        f"kernels, dense model on stock transformers. Recovery: compressed / dense (perplexity: dense / compressed).",
        "",
        "| task | metric | n | dense | compressed | recovery |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        dense = f"{r['dense']:.4f}" if r["dense"] is not None else "-"
        rec = f"{100 * r['recovery']:.1f}%" if r["recovery"] is not None else "-"
        lines.append(f"| {r['task']} | {r['metric']} | {r['samples']} | {dense} | {r['compressed']:.4f} | {rec} |")
    gate = report["gate"]
    if gate["threshold"] is not None:
        verdict = "passed" if not gate["failures"] else "FAILED: " + "; ".join(gate["failures"])
        lines += ["", f"Gate: every metric of {', '.join(gate['tasks'])} ≥ {100 * gate['threshold']:.1f}% — {verdict}"]
    return "\n".join(lines) + "\n"


def limit_text(limit, docs) -> str:
    examples = f"first {limit} examples per task" if limit else "all examples"
    if docs is not None and docs != limit:
        examples += f", first {docs} documents per perplexity task"
    return examples


def dense_cache_file(source: ModelSource, tasks: list[str], limit, docs, batch_size: int) -> Path:
    """Dense results are the same for every artifact of one source: keyed by what could change them (the source
    file's identity, tasks, limit, batch size, lm-eval and sparamx versions), they are computed once."""
    import lm_eval

    from .. import __version__

    where = Path(source.location) / (source.gguf_file or "config.json")
    stat = where.stat() if where.exists() else None
    key = json.dumps(
        [
            source.to_dict(),
            stat and [stat.st_size, stat.st_mtime_ns],
            sorted(tasks),
            limit,
            docs,
            batch_size,
            lm_eval.__version__,
            __version__,
            MAX_LENGTH,
        ],
        sort_keys=True,
    )
    return cache_dir() / "eval" / f"dense-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _evaluate_one(load, tasks, limit, docs, batch_size) -> dict | None:
    model, tokenizer = load()
    try:
        return evaluate(model, tokenizer, tasks, limit=limit, docs=docs, batch_size=batch_size)
    finally:
        del model
        gc.collect()


@dataclass(frozen=True)
class EvalPlan:
    """What `sparamx eval` runs: the options given, else the recipe's eval section, else every offline task."""

    tasks: list[str]
    gated: list[str]
    limit: int | None
    docs: int | None
    threshold: float


def plan_eval(recipe: Recipe, tasks, limit, docs, threshold) -> EvalPlan:
    if threshold is not None and not 0 < threshold <= 1:
        raise SparamxError(f"--threshold must be in (0, 1], got {threshold}")
    for name, value in (("--limit", limit), ("--docs", docs)):
        if value is not None and value < 1:
            raise SparamxError(f"{name} must be a positive number, got {value}")
    tasks = list(tasks or recipe.eval.tasks or default_tasks())
    if not tasks:
        raise SparamxError("no tasks: set SPARAMX_DATA to the shared data folder, or pass --tasks with lm-eval tasks")
    return EvalPlan(
        tasks=tasks,
        gated=list(recipe.eval.tasks or tasks),
        limit=limit if limit is not None else recipe.eval.limit,
        docs=docs if docs is not None else recipe.eval.docs,
        threshold=threshold if threshold is not None else recipe.eval.recovery_threshold,
    )


def evaluate_dense(source: ModelSource, plan: EvalPlan, batch_size: int) -> dict | None:
    """The dense source model's results, cached per source, tasks and limits (a hub model is not cached)."""
    cached = dense_cache_file(source, plan.tasks, plan.limit, plan.docs, batch_size)
    if cached.is_file() and source.kind != "hub":
        return json.loads(cached.read_text())
    results = _evaluate_one(
        lambda: (load_model(source, dtype=torch.float32), load_tokenizer(source)),
        plan.tasks,
        plan.limit,
        plan.docs,
        batch_size,
    )
    if results is not None:
        write_text_atomic(cached, json.dumps(results))
    return results


def run_eval(
    path: str | Path | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    docs: int | None = None,
    threshold: float | None = None,
    dense: bool = True,
    batch_size: int = 4,
    out: str | Path | None = "eval/results",
) -> dict | None:
    """Evaluate an artifact and its dense source; write the comparison; returns the report (None off rank 0).
    Raises GateError after writing everything when the gate fails."""
    from .. import load

    path = Path(path) if path else last_artifact()
    manifest = read_manifest(path)
    recipe = Recipe.from_dict(manifest["recipe"]) if manifest.get("recipe") else Recipe(name="unknown")
    plan = plan_eval(recipe, tasks, limit, docs, threshold)
    start = time.perf_counter()
    source = ModelSource(**manifest["source_model"])
    dense_results = evaluate_dense(source, plan, batch_size) if dense else None
    # kernels=True even without AVX-512: the reference path then computes exactly what the kernels compute (int8
    # activations quantized per token), so the gate judges the artifact as our runtime runs it.
    model = functools.partial(load, path, dtype=torch.float32, kernels=True)
    results = _evaluate_one(model, plan.tasks, plan.limit, plan.docs, batch_size)
    if results is None:  # a non-zero rank of a data-parallel run: rank 0 reports
        return None
    rows = comparison(dense_results, results)
    failures = gate_failures(rows, plan.gated, plan.threshold) if dense else []
    report = eval_report(path, source, recipe, plan, rows, dense_results, results, failures)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if not from_checkpoint(manifest):  # a compressed-tensors checkpoint is not ours to write into
        update_manifest(path, eval=report)
    if out:
        stem = Path(out) / f"eval-{path.name}"
        write_text_atomic(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        write_text_atomic(stem.with_suffix(".md"), markdown(report))
        report["written"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
    if failures:
        raise GateError(f"accuracy gate failed for {path.name} (recipe {recipe.name}): " + "; ".join(failures))
    return report


def eval_report(path: Path, source: ModelSource, recipe: Recipe, plan: EvalPlan, rows, dense, results, failures):
    import lm_eval

    return {
        "artifact": str(path),
        "source": source.name,
        "recipe": recipe.name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "lm_eval": lm_eval.__version__,
        "tasks": plan.tasks,
        "limit": plan.limit,
        "docs": plan.docs,
        "limit_text": limit_text(plan.limit, plan.docs),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "seconds": None,
        "rows": rows,
        "dense": dense,
        "compressed": results,
        "gate": {"tasks": plan.gated, "threshold": plan.threshold, "failures": failures, "passed": not failures},
    }
