"""Decode-attention benchmark: our decode_attention op over a dense and a sparse KV cache beside stock SDPA
(torch.nn.functional.scaled_dot_product_attention, bf16 and fp32, enable_gqa) for one Llama-3-8B layer (32 query
heads, 8 KV heads of 128), one query token per sequence, by context and batch.

Decode reads the whole cache from DRAM once per token, so each op runs over a rotating set of cache copies larger than
the last-level cache (--working-set-gb): a timed pass touches each copy once; the median of the repeats is reported,
in ms and in GB/s of cache bytes read (values + masks for the packed part), next to a measured memory-read bandwidth.

    python -m sparamx.eval.bench_attention --out eval/results     (part of make bench) -> attention.{json,md,png}
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ..kernels import cpu_paths, ops
from ..pipeline.kv_sparsity import kept_elements, prune_pack
from .bench_kernels import copies_for, read_bandwidth

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B


def sparse_cache(k: torch.Tensor, v: torch.Tensor, sparsity: float):
    """(k, v) as the op takes them: every token packed at `sparsity` but the last few that do not fill a K tile,
    which stay dense (0: all tokens dense)."""
    b, h, t, d = k.shape
    if sparsity == 0:
        none = (k.new_zeros((b, h, 0, d)), k.new_zeros((b, h, 0, d // 8), dtype=torch.uint8))
        return (*none, k), (*none, v), 0, t
    keep, tile = kept_elements(d, sparsity), ops.kv_tile()
    packed = t // tile * tile
    k_stream = (*prune_pack(k[:, :, :packed], keep, tile), k[:, :, packed:].contiguous())
    v_stream = (*prune_pack(v[:, :, :packed], keep), v[:, :, packed:].contiguous())
    return k_stream, v_stream, packed, t - packed


def cache_bytes(stream) -> int:
    return sum(x.numel() * x.element_size() for x in stream)


def bench_case(batch: int, context: int, sparsities, working_set: float, repeats: int, gen) -> list[dict]:
    kv_bytes = 2 * batch * KV_HEADS * context * HEAD_DIM * 2
    copies = copies_for(kv_bytes, working_set)
    dense = [
        tuple(torch.randn(batch, KV_HEADS, context, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
        for _ in range(copies)
    ]
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen).bfloat16()
    scale = HEAD_DIM**-0.5
    runs = {}
    for s in sparsities:
        caches = [sparse_cache(k, v, s) for k, v in dense]
        name = "sparamx dense cache" if s == 0 else f"sparamx {s:.0%} / {s:.0%}"
        read = cache_bytes(caches[0][0]) + cache_bytes(caches[0][1])
        runs[name] = (
            lambda i, c=caches: ops.decode_attention(q, c[i][0], c[i][1], c[i][2], c[i][3], None, scale),
            read,
        )
    q4 = q[:, :, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    runs["stock SDPA bf16"] = (lambda i: sdpa(q4, dense[i][0], dense[i][1], enable_gqa=True), kv_bytes)
    fp32 = [(k.float(), v.float()) for k, v in dense[: max(2, copies // 2)]]  # twice the bytes: half the copies
    runs["stock SDPA fp32"] = (lambda i: sdpa(q4.float(), *fp32[i % len(fp32)], enable_gqa=True), 2 * kv_bytes)
    times = {name: [] for name in runs}
    for _ in range(repeats + 1):  # the first pass warms up
        for name, (fn, _) in runs.items():
            start = time.perf_counter()
            for i in range(copies):
                fn(i)
            times[name].append((time.perf_counter() - start) / copies)
    rows = []
    for name, (_, read) in runs.items():
        seconds = statistics.median(times[name][1:])
        rows.append({"batch": batch, "context": context, "runtime": name, "ms": seconds * 1e3,
                     "cache_mb": read / 2**20, "gbps": read / seconds / 1e9})  # fmt: skip
    return rows


def markdown(rows: list[dict], bandwidth: float) -> str:
    lines = [
        f"Measured read bandwidth: {bandwidth / 1e9:.1f} GB/s",
        "",
        "| batch | context | runtime | ms | cache MiB read | GB/s | % of read bandwidth | × stock SDPA bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    stock = {(r["batch"], r["context"]): r["ms"] for r in rows if r["runtime"] == "stock SDPA bf16"}
    for r in rows:
        speedup = stock[r["batch"], r["context"]] / r["ms"]
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['runtime']} | {r['ms']:.3f} | {r['cache_mb']:.1f} | "
            f"{r['gbps']:.1f} | {100 * r['gbps'] * 1e9 / bandwidth:.0f}% | {speedup:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for runtime in dict.fromkeys(r["runtime"] for r in rows):
            sel = [r for r in rows if r["batch"] == batch and r["runtime"] == runtime]
            ax.plot([r["context"] for r in sel], [r["ms"] for r in sel], marker="o", label=runtime)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step, one layer")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparamx.eval.bench_attention", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--contexts", default="1024,4096,8192,16384", help="comma-separated context lengths")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--sparsities", default="0,0.5,0.7", help="K = V sparsity levels of our cache")
    parser.add_argument("--working-set-gb", type=float, default=2.5, help="rotating set per op (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="eval/results", help="folder for attention.{json,md,png}")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    bandwidth = read_bandwidth(args.working_set_gb, args.repeats)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            rows += bench_case(batch, context, sparsities, args.working_set_gb, args.repeats, gen)
    title = (
        f"{cpu_paths.cpu_model()}, {torch.get_num_threads()} threads, decode_attention on "
        f"{cpu_paths.describe_isa()}; one Llama-3-8B layer ({HEADS} query / {KV_HEADS} KV heads of {HEAD_DIM})"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"title": title, "read_bandwidth_gbps": bandwidth / 1e9, "rows": rows}
    (out / "attention.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "attention.md").write_text(f"{title}\n\n{markdown(rows, bandwidth)}")
    plot(rows, out / "attention.png", title)
    print(f"{title}\n\n{markdown(rows, bandwidth)}", end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
