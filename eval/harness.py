"""lm-eval over a loaded model: the tasks (offline YAMLs in eval/tasks, or lm-eval's own when the hub is reachable),
the LM wrapper, and data parallelism across processes started by `accelerate launch` or `torchrun`.

lm-eval's HFLM runs data-parallel only when it loads the model itself onto GPUs; on CPU, with a model that
sparamx.load built, we give it the process group ourselves and reuse its request sharding and gathering.
"""

import logging
import os
from pathlib import Path

import torch
from lm_eval.models.huggingface import HFLM

from ..pipeline.errors import DataError
from ..pipeline.textdata import data_root

# lm-eval warns, for every task with a custom_dataset, how to pass metadata on its command line: not our users' concern.
logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# The long-context cap for rolling perplexity: windows of 2048 tokens, as Wanda / SparseGPT report WikiText-2.
MAX_LENGTH = 2048


def offline_tasks() -> list[str]:
    """Names of the offline tasks shipped in eval/tasks, in a stable order."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def default_tasks() -> list[str]:
    """The offline tasks; without a data folder, none (the caller must then name hub tasks)."""
    return offline_tasks() if data_root() is not None else []


def task_manager(tasks: list[str]):
    """A TaskManager that knows our offline tasks (reading from $SPARAMX_DATA) and, only when a task outside them is
    asked for, lm-eval's own catalogue (indexing it takes seconds)."""
    from lm_eval.tasks import TaskManager

    local = set(offline_tasks())
    wanted_local = [t for t in tasks if t in local]
    root = data_root()
    if wanted_local and (root is None or not root.is_dir()):
        raise DataError(
            f"task {wanted_local[0]} reads its data from $SPARAMX_DATA, which is unset or not a folder "
            "(point it at the shared data folder, e.g. ../shared/data)"
        )
    metadata = {"data_root": str(root.resolve())} if root is not None else {}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(set(tasks) - local), metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DataError(
            f"unknown lm-eval task {unknown[0]!r}: offline tasks are {', '.join(sorted(local))}; "
            "other names must be lm-eval tasks (and need the hub for their data)"
        )
    return manager


class SparamxLM(HFLM):
    """HFLM over an already-built transformers model (ours or stock) on the CPU, data-parallel when this process is
    one of several started by `accelerate launch` / `torchrun` (each scores its share, rank 0 gathers)."""

    def __init__(self, model, tokenizer, batch_size: int = 4, max_length: int | None = None):
        context = getattr(model.config, "max_position_embeddings", None) or MAX_LENGTH
        max_length = max_length or min(context, MAX_LENGTH)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=True)
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes


def evaluate(
    model, tokenizer, tasks: list[str], limit: int | None = None, docs: int | None = None, batch_size: int = 4
) -> dict | None:
    """lm-eval `simple_evaluate` of `model` on `tasks` -> {task: {"metrics": {metric: value, stderr,
    higher_is_better}, "samples": n}} on rank 0; None on the other ranks of a data-parallel run.

    `limit`: the first N examples of each task; `docs`: the first N documents of each rolling-perplexity task instead
    (a WikiText article is thousands of tokens, a multiple-choice example a few dozen)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.task import Task
    from lm_eval.tasks import get_task_dict

    manager = task_manager(tasks)
    loaded = get_task_dict(list(tasks), manager)
    flat = all(isinstance(t, Task) for t in loaded.values())  # no groups: hand lm-eval the tasks loaded here
    samples = None
    if flat and (limit is not None or docs is not None):
        samples = {}
        for name, task in loaded.items():
            n = docs if task.OUTPUT_TYPE == "loglikelihood_rolling" and docs is not None else limit
            if n is not None:
                samples[name] = list(range(min(n, len(task.eval_docs))))
    lm = SparamxLM(model, tokenizer, batch_size=batch_size)
    with torch.no_grad():
        out = simple_evaluate(
            lm,
            tasks=list(loaded.values()) if flat else list(tasks),
            limit=None if samples is not None else limit,
            samples=samples,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
        )
    if out is None:  # not rank 0
        return None
    results = {}
    for task in tasks:
        values = out["results"][task]
        better = out["higher_is_better"].get(task, {})
        metrics = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            metrics[metric] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                "higher_is_better": bool(better.get(metric, True)),
            }
        results[task] = {"metrics": metrics, "samples": int(out["n-samples"][task]["effective"])}
    return results
