"""Token perplexity over non-overlapping windows of a text, as GPTQ / SparseGPT / Wanda report it for WikiText-2."""

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def window_nlls(
    model, tokenizer, text: str, seqlen: int = 1024, max_windows: int | None = None, progress: bool = True
) -> list[float]:
    """Mean next-token NLL of each of the first `max_windows` windows of `seqlen` tokens of `text`."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    nwindows = ids.shape[1] // seqlen
    if max_windows is not None:
        nwindows = min(nwindows, max_windows)
    if nwindows == 0:
        raise ValueError(f"text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    nlls = []
    for i in tqdm(range(nwindows), desc="perplexity", unit="window", disable=not progress):
        window = ids[:, i * seqlen : (i + 1) * seqlen]
        logits = model(window, use_cache=False).logits.float()
        nlls.append(torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="mean").item())
    return nlls


def perplexity(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls))


def token_perplexity(
    model, tokenizer, text: str, seqlen: int = 1024, max_windows: int | None = None, progress: bool = True
) -> float:
    """exp(mean next-token NLL) over the first `max_windows` windows of `seqlen` tokens of `text`."""
    return perplexity(window_nlls(model, tokenizer, text, seqlen, max_windows, progress))
