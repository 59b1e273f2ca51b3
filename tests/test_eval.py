"""`sparamx eval`: offline lm-eval tasks over the shared data, recovery and gates, results written atomically, and
data-parallel evaluation with 2 processes (a tiny random Llama keeps these fast; the real model is in
test_end_to_end.py)."""

import json
import os
import subprocess
import sys

import pytest

import sparamx
from sparamx.eval.accuracy import comparison, gate_failures, recovery, run_eval
from sparamx.eval.harness import offline_tasks, task_manager
from sparamx.pipeline.errors import DataError, SparamxError
from sparamx.pipeline.recipe import EvalConfig, PruneConfig, Recipe, RecipeError

# Examples in each offline task (../shared/data/README.md).
SIZES = {
    "wikitext_local": 62,
    "arc_easy_local": 2376,
    "arc_challenge_local": 1172,
    "boolq_local": 3270,
    "piqa_local": 1838,
    "hellaswag_local": 10042,
    "winogrande_local": 1267,
    "rte_local": 277,
    "openbookqa_local": 500,
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Dense results and the last-artifact pointer go to a per-test cache, not the user's."""
    monkeypatch.setenv("SPARAMX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("eval") / "tiny-magnitude-50"
    recipe = Recipe(name="magnitude-50", prune=PruneConfig(method="magnitude", sparsity=0.5))
    sparamx.compress(str(tiny_model_dir), recipe, out=out, progress=False)
    return out


def test_every_offline_task_reads_the_shared_data(data_root):
    assert offline_tasks() == sorted(SIZES)
    manager = task_manager(offline_tasks())
    tasks = manager.load_task_or_group(offline_tasks())
    for name, task in tasks.items():
        name = getattr(name, "group_name", name)
        docs = list(task.eval_docs)
        assert len(docs) == SIZES[name], name
        if task.OUTPUT_TYPE == "multiple_choice":
            for doc in docs[:50]:
                choices, text, target = task.doc_to_choice(doc), task.doc_to_text(doc), task.doc_to_target(doc)
                assert len(choices) >= 2, name
                # winogrande is scored the other way round: the text is the gold option's index, the target shared
                gold, rest = (text, target) if isinstance(text, int) else (target, text)
                assert isinstance(gold, int) and 0 <= gold < len(choices) and isinstance(rest, str) and rest, name


def test_an_unknown_task_or_missing_data_is_one_clear_error(monkeypatch):
    with pytest.raises(DataError, match="unknown lm-eval task 'no_such_task'"):
        task_manager(["no_such_task_local_only"][:0] + ["no_such_task"])
    monkeypatch.delenv("SPARAMX_DATA")
    with pytest.raises(DataError, match="SPARAMX_DATA"):
        task_manager(["piqa_local"])


def test_recovery_is_one_when_nothing_is_lost_for_both_directions():
    assert recovery(0.5, 0.4, higher_is_better=True) == pytest.approx(0.8)
    assert recovery(20.0, 25.0, higher_is_better=False) == pytest.approx(0.8)
    dense = {"t": {"metrics": {"acc": {"value": 0.5, "higher_is_better": True}}, "samples": 10}}
    ours = {"t": {"metrics": {"acc": {"value": 0.4, "higher_is_better": True}}, "samples": 10}}
    rows = comparison(dense, ours)
    assert rows[0]["recovery"] == pytest.approx(0.8)
    assert gate_failures(rows, ["t"], 0.79) == []
    assert "t acc: 80.0% of dense" in gate_failures(rows, ["t"], 0.9)[0]
    assert gate_failures(rows, ["other"], 0.9) == []  # only the gated tasks count
    assert gate_failures(rows, ["t"], None) == []


def test_recipe_eval_keys_are_checked():
    config = Recipe.from_dict({"name": "x", "eval": {"tasks": ["piqa_local"], "recovery_threshold": 0.9}}).eval
    assert config == EvalConfig(tasks=["piqa_local"], recovery_threshold=0.9)
    for bad in ({"recovery_threshold": 1.5}, {"tasks": "piqa"}, {"limit": 0}, {"gate": 1}):
        with pytest.raises(RecipeError, match="eval"):
            Recipe.from_dict({"name": "x", "eval": bad})


def test_eval_writes_the_comparison_and_reuses_dense_results(artifact, tmp_path):
    out = tmp_path / "results"
    report = run_eval(artifact, tasks=["arc_easy_local", "wikitext_local"], limit=4, out=out)
    metrics = {(r["task"], r["metric"]) for r in report["rows"]}
    assert metrics == {("arc_easy_local", "acc"), ("arc_easy_local", "acc_norm"), ("wikitext_local", "word_perplexity")}
    assert all(r["dense"] is not None and r["samples"] == 4 for r in report["rows"])
    stored = json.loads((artifact / "sparamx.json").read_text())["eval"]
    assert stored["rows"] == json.loads((out / f"eval-{artifact.name}.json").read_text())["rows"] == report["rows"]
    assert "| arc_easy_local | acc |" in (out / f"eval-{artifact.name}.md").read_text()
    sparamx.load(artifact)  # the rewritten manifest still verifies

    # The gate itself on the real model (wanda-50 passes, magnitude-90 fails) is in test_end_to_end.py; here the
    # cached dense results are reused and a low threshold passes.
    again = run_eval(artifact, tasks=["arc_easy_local", "wikitext_local"], limit=4, threshold=0.01, out=None)
    assert again["gate"]["passed"] and again["gate"]["threshold"] == 0.01 and again["gate"]["failures"] == []
    assert again["dense"] == report["dense"]
    with pytest.raises(SparamxError, match="threshold"):
        run_eval(artifact, tasks=["arc_easy_local"], limit=4, threshold=1.5, out=None)


def test_eval_without_a_path_takes_the_last_pruned_artifact(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sparamx.cli", "eval"],
        capture_output=True,
        text=True,
        env={**os.environ, "SPARAMX_CACHE": str(tmp_path / "empty")},
    )
    assert result.returncode == 2 and "make prune" in result.stderr.strip().splitlines()[-1]


def _launch(args: list[str], processes: int, env: dict) -> subprocess.CompletedProcess:
    # On a machine without GPUs, accelerate's --multi_gpu launcher starts torchrun workers that talk over gloo
    # (its --cpu flag runs one process, and multi-CPU otherwise means mpirun).
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--num_cpu_threads_per_process", "1", "-m", "sparamx.cli"]
    return subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_give_the_single_process_numbers(artifact, tmp_path):
    """accelerate launch with 2 CPU processes: each scores half the requests, rank 0 gathers; the numbers are the
    ones a single process gets."""
    args = ["eval", str(artifact), "--tasks", "arc_easy_local,wikitext_local", "--limit", "6", "--docs", "2"]
    args += ["--no-dense"]
    env = {**os.environ, "SPARAMX_CACHE": str(tmp_path / "cache")}
    single = subprocess.run(
        [sys.executable, "-m", "sparamx.cli", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    double = _launch([*args, "--out", str(tmp_path / "two")], 2, env)
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / f"eval-{artifact.name}.json").read_text())
    two = json.loads((tmp_path / "two" / f"eval-{artifact.name}.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert {r["task"]: r["samples"] for r in one["rows"]} == {"arc_easy_local": 6, "wikitext_local": 2}
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert (a["task"], a["metric"], a["samples"]) == (b["task"], b["metric"], b["samples"])
        assert b["compressed"] == pytest.approx(a["compressed"], rel=1e-4)
