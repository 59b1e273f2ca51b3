"""What KV-cache sparsity costs in accuracy, measured where it acts: teacher-forced decode. For each window of a
context's length of WikiText-2, the first context - decode tokens are one prefill, then the last `decode` tokens go
through the cache one at a time (so every prediction reads the pruned cache), and each step's next-token distribution
is compared with the dense cache's: perplexity of the true tokens, KL(dense || sparse), top-1 agreement.
(lm-eval's loglikelihood requests are one dense prefill each and never read the cache, so they cannot show this.)

python -m sparamx.eval.kv_accuracy --model smollm2-135m --contexts 1024,2048,4096 --out eval/results
-> kv-accuracy.json, kv-accuracy.md, kv-accuracy.png
"""

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..kernels import cpu_paths, kv_cache
from ..kernels.kv_cache import SparseKVCache
from ..pipeline.kv_sparsity import KVConfig
from ..pipeline.models import load_model, load_tokenizer, resolve_model
from ..pipeline.textdata import load_documents

SPARSITIES = (0.0, 0.3, 0.5, 0.7)


@torch.no_grad()
def decode_logprobs(model, window: torch.Tensor, decode: int, kv: KVConfig) -> torch.Tensor:
    """Log-probabilities [decode, vocab] of each of the window's last `decode` tokens' successors, the prefix
    prefilled and those tokens fed one at a time through a SparseKVCache with settings `kv`."""
    model.sparamx_kv = kv
    cache = SparseKVCache(model.config, kv)
    prefix = window.shape[1] - decode
    out = model(window[:, :prefix], cache=cache, use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(prefix, window.shape[1] - 1):
        steps.append(model(window[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.log_softmax(torch.cat(steps).float(), dim=-1)


def compare(dense: torch.Tensor, sparse: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-window sums (so windows can be pooled): NLL of the true tokens, KL(dense || sparse), top-1 agreements."""
    return {
        "nll": -sparse.gather(1, targets[:, None]).sum().item(),
        "kl": (dense.exp() * (dense - sparse)).sum().item(),
        "agree": (dense.argmax(-1) == sparse.argmax(-1)).sum().item(),
        "tokens": targets.numel(),
    }


def measure(model, ids: torch.Tensor, context: int, windows: int, decode: int, settings, recent: int) -> list[dict]:
    """One row per (k, v) sparsity at this context length, pooled over `windows` windows of `ids`."""
    totals = {s: {"nll": 0.0, "kl": 0.0, "agree": 0, "tokens": 0} for s in settings}
    if ids.shape[1] < windows * context:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than {windows} windows of {context}")
    for w in range(windows):
        window = ids[:, w * context : (w + 1) * context]
        targets = window[0, context - decode :]
        dense = decode_logprobs(model, window, decode, KVConfig(recent=recent))
        for s in tqdm(settings, desc=f"context {context}, window {w + 1}/{windows}", unit="setting", leave=False):
            sparse = dense if s == (0.0, 0.0) else decode_logprobs(model, window, decode, _kv(s, recent))
            for key, value in compare(dense, sparse, targets).items():
                totals[s][key] += value
    rows = []
    for (k, v), t in totals.items():
        n = t["tokens"]
        ppl = math.exp(t["nll"] / n)
        rows.append({"context": context, "k_sparsity": k, "v_sparsity": v, "perplexity": ppl, "kl": t["kl"] / n,
                     "top1_agreement": t["agree"] / n, "tokens": n})  # fmt: skip
    base = next(r["perplexity"] for r in rows if r["k_sparsity"] == r["v_sparsity"] == 0)
    for r in rows:
        r["perplexity_change"] = r["perplexity"] / base - 1
    return rows


def _kv(setting: tuple[float, float], recent: int) -> KVConfig:
    return KVConfig(k_sparsity=setting[0], v_sparsity=setting[1], recent=recent)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"KV-cache sparsity, teacher-forced decode of the last {meta['decode']} tokens of {meta['windows']} "
        f"WikiText-2 window(s) per context; {meta['model']} (bf16 weights), recent {meta['recent']} tokens dense; "
        f"{meta['cpu']}, {meta['path']}.",
        "",
        "| context | K sparsity | V sparsity | perplexity | vs dense cache | KL(dense ‖ sparse) | top-1 agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['k_sparsity']:g} | {r['v_sparsity']:g} | {r['perplexity']:.2f} | "
            f"{100 * r['perplexity_change']:+.2f}% | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for context in sorted({r["context"] for r in rows}):
        diagonal = [r for r in rows if r["context"] == context and r["k_sparsity"] == r["v_sparsity"]]
        xs = [r["k_sparsity"] for r in diagonal]
        ax.plot(xs, [100 * r["perplexity_change"] for r in diagonal], marker="o", label=f"context {context}")
    ax.axhline(2, color="grey", linestyle="--", linewidth=1, label="+2%")
    ax.set_xlabel("K and V sparsity (each)")
    ax.set_ylabel("perplexity vs dense cache (%)")
    ax.set_title("KV-cache sparsity: teacher-forced decode, WikiText-2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparamx.eval.kv_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, hub id, model directory or .gguf")
    parser.add_argument("--contexts", default="1024,2048,4096", help="comma-separated context lengths")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="K and V levels (a full grid)")
    parser.add_argument("--windows", type=int, default=1, help="windows per context (default: %(default)s)")
    parser.add_argument("--decode", type=int, default=256, help="tokens decoded one at a time (default: %(default)s)")
    parser.add_argument("--recent", type=int, default=KVConfig.recent, help="newest tokens kept dense")
    parser.add_argument("--out", default="eval/results", help="folder for kv-accuracy.{json,md,png}")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    levels = [float(s) for s in args.sparsities.split(",")]
    settings = list(itertools.product(levels, levels))
    source = resolve_model(args.model)
    model = load_model(source, dtype=torch.bfloat16).eval()
    kv_cache.install(model, KVConfig())
    tokenizer = load_tokenizer(source)
    text = "\n\n".join(load_documents("wikitext2-test"))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    start = time.perf_counter()
    rows = [r for c in contexts for r in measure(model, ids, c, args.windows, args.decode, settings, args.recent)]
    meta = {"model": args.model, "windows": args.windows, "decode": args.decode, "recent": args.recent,
            "cpu": cpu_paths.cpu_model(), "path": f"decode_attention on {cpu_paths.describe_isa()}",
            "threads": torch.get_num_threads(), "seconds": time.perf_counter() - start}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv-accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "kv-accuracy.md").write_text(markdown(rows, meta))
    plot(rows, out / "kv-accuracy.png")
    print(markdown(rows, meta), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
