"""Offline datasets for the tasks in this folder: each function reads one benchmark from the shared data folder
(`SPARAMX_DATA`, see ../shared/data/README.md) into the fields lm-eval's own task of that name uses.

lm-eval calls a task's `custom_dataset` with the task's metadata as keyword arguments; `sparamx eval` puts the data
folder there as `data_root`, so no function reads the environment or the network.
"""

import csv
import json
from pathlib import Path

import datasets


def _root(data_root=None, **_) -> Path:
    if not data_root:
        raise ValueError("offline sparamx tasks need metadata data_root (the folder SPARAMX_DATA names)")
    return Path(data_root)


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _split(rows: list[dict], split: str = "validation") -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def wikitext(**meta) -> datasets.DatasetDict:
    """WikiText-2 raw test as 62 whole articles (field "page", as EleutherAI/wikitext_document_level has it)."""
    docs = _jsonl(_root(**meta) / "wikitext-2-raw" / "wikitext2_test_docs.jsonl")
    return _split([{"page": d["text"]} for d in docs], "test")


def _arc(subset: str, **meta) -> datasets.DatasetDict:
    rows = _jsonl(_root(**meta) / "arc" / subset / f"{subset}-Test.jsonl")
    return _split(
        [
            {
                "question": r["question"]["stem"],
                "choices": {
                    "text": [c["text"] for c in r["question"]["choices"]],
                    "label": [c["label"] for c in r["question"]["choices"]],
                },
                "answerKey": r["answerKey"],
            }
            for r in rows
        ],
        "test",
    )


def arc_easy(**meta) -> datasets.DatasetDict:
    return _arc("ARC-Easy", **meta)


def arc_challenge(**meta) -> datasets.DatasetDict:
    return _arc("ARC-Challenge", **meta)


def boolq(**meta) -> datasets.DatasetDict:
    rows = _jsonl(_root(**meta) / "boolq" / "val.jsonl")
    label = {"false": 0, "true": 1, False: 0, True: 1}  # lm-eval's choices are ["no", "yes"]
    return _split([{"question": r["question"], "passage": r["passage"], "label": label[r["label"]]} for r in rows])


def piqa(**meta) -> datasets.DatasetDict:
    folder = _root(**meta) / "piqa"
    rows, labels = _jsonl(folder / "valid.jsonl"), _labels(folder / "valid-labels.lst")
    if len(rows) != len(labels):
        raise ValueError(f"{folder}: {len(rows)} questions but {len(labels)} labels")
    pairs = zip(rows, labels, strict=True)
    return _split([{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y} for r, y in pairs])


def hellaswag(**meta) -> datasets.DatasetDict:
    """Already preprocessed as lm-eval's hellaswag process_docs would (query = "activity: context")."""
    rows = _jsonl(_root(**meta) / "hellaswag" / "hellaswag_val_from_llamacpp_txt.jsonl")
    return _split([{"query": r["query"], "choices": r["endings"], "label": int(r["label"])} for r in rows])


def winogrande(**meta) -> datasets.DatasetDict:
    rows = _jsonl(_root(**meta) / "winogrande" / "dev.jsonl")
    keep = ("sentence", "option1", "option2", "answer")
    return _split([{k: str(r[k]) for k in keep} for r in rows])


def rte(**meta) -> datasets.DatasetDict:
    rows = _jsonl(_root(**meta) / "rte" / "val.jsonl")
    label = {"entailment": 0, "not_entailment": 1}
    return _split([{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": label[r["label"]]} for r in rows])


def openbookqa(**meta) -> datasets.DatasetDict:
    """OpenBookQA test from the original TSV: choices "(A) text (B) text ..." split into lists."""
    import re

    path = _root(**meta) / "openbookqa" / "test.tsv"
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:  # no quoting: stems contain bare quotes
        for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            parts = re.split(r"\(([A-D])\) ", r["Choices"])[1:]
            labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
            rows.append(
                {
                    "question_stem": r["Question Stem"],
                    "choices": {"text": texts, "label": labels},
                    "answerKey": r["Answer Key"].strip(),
                }
            )
    return _split(rows, "test")
