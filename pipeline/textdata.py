"""Real text for calibration and evaluation: local files (SPARAMX_DATA, --calib PATH) or the dataset hub when online.

Calibration joins documents and cuts the token stream into `nsamples` windows of `seqlen` tokens, as GPTQ/Wanda do
for C4; documents are shuffled with the recipe's seed first, so the windows are reproducible.
"""

import json
import os
import random
from pathlib import Path

import torch

from .errors import DataError

# Named datasets -> file under SPARAMX_DATA (see ../shared/data/README.md), and the hub fallback.
LOCAL_FILES = {
    "c4": "c4-sample/c4_docs.jsonl",
    "wikitext2": "wikitext-2-tokenized/valid.txt",  # the raw train split is not shipped offline
    "wikitext2-test": "wikitext-2-raw/wikitext2_test_joined.txt",
}
HUB_DATASETS = {
    "c4": ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", None),
    "wikitext2-test": ("wikitext", "wikitext-2-raw-v1", "test", None),
}


def data_root() -> Path | None:
    root = os.environ.get("SPARAMX_DATA")
    return Path(root) if root else None


def read_documents(path: Path) -> list[str]:
    """Documents from a .jsonl file (field "text"), a text file (one document), or a folder of those."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt", ".raw"))
        if not files:
            raise DataError(f"{path}: no .jsonl or .txt files in this folder")
        return [doc for f in files for doc in read_documents(f)]
    if not path.is_file():
        raise DataError(f"{path}: text file not found")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
            if record["text"].strip():
                docs.append(record["text"])
    return docs


def load_documents(dataset: str, path: str | Path | None = None) -> list[str]:
    """Documents of a named dataset (c4, wikitext2, wikitext2-test) or of a path; local first, hub second."""
    if path is not None:
        return read_documents(Path(path))
    if dataset not in LOCAL_FILES:
        return read_documents(Path(dataset))
    root = data_root()
    if root is not None:
        return read_documents(root / LOCAL_FILES[dataset])
    from datasets import load_dataset

    name, config, split, files = HUB_DATASETS[dataset]
    try:
        rows = load_dataset(name, config, split=split, data_files=files)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable line
        raise DataError(
            f"cannot load dataset {name!r} from the hub ({str(exc).splitlines()[0]}); "
            "set SPARAMX_DATA to a folder of local text (see README) or pass --calib PATH"
        ) from exc
    return [text for text in rows["text"] if text.strip()]


def calibration_windows(
    tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int = 0
) -> list[torch.Tensor]:
    """`nsamples` non-overlapping windows of `seqlen` token ids ([1, seqlen] each) from shuffled, joined documents."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    need = nsamples * seqlen
    ids: list[int] = []
    for start in range(0, len(order), 64):
        chunk = "\n\n".join(documents[i] for i in order[start : start + 64])
        ids.extend(tokenizer(chunk + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < seqlen:
        raise DataError(f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}")
    if len(ids) < need:
        raise DataError(
            f"calibration text has {len(ids)} tokens, fewer than nsamples x seqlen = {nsamples} x {seqlen}; "
            f"lower calibration.nsamples to {len(ids) // seqlen} or add text"
        )
    stream = torch.tensor(ids[:need], dtype=torch.long)
    return list(stream.view(nsamples, 1, seqlen))
