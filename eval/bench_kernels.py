"""Kernel microbenchmark at Llama-3-8B shapes: our four linear formats beside torch F.linear (bf16, fp32), on the
kernel path isa=auto picks or the one --isa forces, compared with the faster of the two torch dtypes ("best stock").

Decode streams weights from DRAM, so every op runs over a rotating set of weight copies larger than the last-level
cache (--working-set-gb, default 2.5): each timed pass touches each copy once. Ops are interleaved within each repeat
and the median of the repeats is reported, next to a measured memory-read bandwidth (a fp32 sum over the same kind of
rotating set). Writes JSON, a markdown table and a PNG plot.

    python -m sparamx.eval.bench_kernels --out eval/results              (make bench-kernels)
    python -m sparamx.eval.bench_kernels --out eval/results --isa avx2   (-> kernels-avx2.*)
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ..kernels import cpu_paths, ops

OURS = ("bitmap bf16", "bitmap int8", "dense bf16", "dense int8")
LLAMA3_8B = {
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate/up": (14336, 4096),
    "down": (4096, 14336),
}


def copies_for(nbytes: int, working_set: float) -> int:
    return max(2, int(working_set * 2**30 // nbytes) + 1)


def read_bandwidth(working_set: float, repeats: int) -> float:
    chunk = 256 * 2**20 // 4
    bufs = [torch.rand(chunk) for _ in range(copies_for(chunk * 4, working_set))]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for b in bufs:
            b.sum()
        times.append(time.perf_counter() - start)
    return len(bufs) * chunk * 4 / statistics.median(times[1:])


def time_pass(fn, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - start) / count


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w ~ scale * q, scale = absmax / 127."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def packed_nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def bench_shape(name, n, k, sparsity, ms, working_set, repeats, gen):
    count = copies_for(n * k * 4, working_set)  # sized by the fp32 copies, the largest
    dense, bf16, formats = [], [], {op: [] for op in OURS}
    for _ in range(count):
        w = torch.randn(n, k, generator=gen)
        w[torch.rand(n, k, generator=gen) < sparsity] = 0
        dense.append(w)
        bf16.append(w.bfloat16())
        q, scale = int8_rows(w)
        formats["bitmap bf16"].append((ops.bitmap_prepack(*ops.bitmap_pack(bf16[-1]), k), None))
        formats["bitmap int8"].append((ops.bitmap_prepack(*ops.bitmap_pack(q), k), scale))
        formats["dense bf16"].append((ops.dense_prepack(bf16[-1]), None))
        formats["dense int8"].append((ops.dense_prepack(q), scale))
    nbytes = {"torch fp32": n * k * 4, "torch bf16": n * k * 2}
    for op, copies in formats.items():
        packed, scale = copies[0]
        nbytes[op] = packed_nbytes(packed) + (scale.nbytes if scale is not None else 0)
    rows = []
    for m in ms:
        x32 = torch.randn(m, k, generator=gen)
        x16 = x32.bfloat16()
        fns = {
            "torch bf16": lambda i, x=x16: torch.nn.functional.linear(x, bf16[i]),
            "torch fp32": lambda i, x=x32: torch.nn.functional.linear(x, dense[i]),
        }
        for op, copies in formats.items():
            linear = ops.bitmap_linear if op.startswith("bitmap") else ops.dense_linear
            fns[op] = lambda i, x=x16, c=copies, f=linear: f(x, c[i][0], n, k, c[i][1])
        for fn in fns.values():
            time_pass(fn, count)  # warm-up
        samples = {op: [] for op in fns}
        for _ in range(repeats):
            for op, fn in fns.items():
                samples[op].append(time_pass(fn, count))
        base = statistics.median(samples["torch bf16"])
        best_stock = min(base, statistics.median(samples["torch fp32"]))
        for op, ts in samples.items():
            t = statistics.median(ts)
            rows.append(
                {
                    "layer": name,
                    "shape": [n, k],
                    "sparsity": sparsity,
                    "m": m,
                    "op": op,
                    "ms": t * 1e3,
                    "gbps": nbytes[op] / t / 1e9,
                    "speedup_vs_torch_bf16": base / t,
                    "speedup_vs_best_stock": best_stock / t,
                    "copies": count,
                }
            )
    return rows


def summary(rows, bandwidth) -> str:
    """The condensed table (README): per layer, format and sparsity, speed-up over the best stock torch linear (% of
    read bandwidth) at each M."""
    ms = sorted({r["m"] for r in rows})
    cells: dict[tuple, dict[int, str]] = {}
    for r in rows:
        if r["op"] in OURS:
            key = (r["layer"], f"{r['shape'][0]}×{r['shape'][1]}", r["op"], r["sparsity"])
            share = 100 * r["gbps"] * 1e9 / bandwidth
            cells.setdefault(key, {})[r["m"]] = f"{r['speedup_vs_best_stock']:.2f}× ({share:.0f}%)"
    lines = [
        "| layer | shape | format | sparsity | " + " | ".join(f"M={m}" for m in ms) + " |",
        "|---|---|---|---|" + "---|" * len(ms),
    ]
    for (layer, shape, op, sparsity), by_m in cells.items():
        shown = "—" if op.startswith("dense") else f"{sparsity:.1f}"
        if op.startswith("dense") and sparsity != 0.5 and any(k[3] == 0.5 for k in cells):
            continue  # dense formats ignore sparsity: one row each
        lines.append(f"| {layer} | {shape} | {op} | {shown} | " + " | ".join(by_m.get(m, "") for m in ms) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows, bandwidth) -> str:
    lines = [
        f"Measured read bandwidth: {bandwidth / 1e9:.1f} GB/s",
        "",
        "Speed-up over the best stock torch linear, the faster of F.linear bf16 and fp32 "
        "(% of the measured read bandwidth):",
        "",
        summary(rows, bandwidth),
        "All rows:",
        "",
        "| layer | shape | sparsity | M | op | ms | GB/s | × torch bf16 | × best stock | % of read BW |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['sparsity']:.1f} | {r['m']} | {r['op']} | "
            f"{r['ms']:.3f} | {r['gbps']:.1f} | {r['speedup_vs_torch_bf16']:.2f} | {r['speedup_vs_best_stock']:.2f} | "
            f"{100 * r['gbps'] * 1e9 / bandwidth:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted({r["m"] for r in rows})
    fig, axes = plt.subplots(1, len(ms), figsize=(4 * len(ms), 3.5), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], ms, strict=True):
        for op in OURS:
            ours = [r for r in rows if r["m"] == m and r["op"] == op]
            levels = sorted({r["sparsity"] for r in ours})
            # One line per format: the median over the layer shapes at each sparsity.
            speedup = [
                statistics.median(r["speedup_vs_best_stock"] for r in ours if r["sparsity"] == s) for s in levels
            ]
            ax.plot(levels, speedup, marker="o", label=op)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"M = {m}")
        ax.set_xlabel("sparsity")
    axes[0][0].set_ylabel("speed-up vs best stock torch (median over shapes)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eval/results", help="folder for kernels.json / kernels.md / kernels.png")
    parser.add_argument("--shapes", nargs="*", help="NxK shapes instead of Llama-3-8B's (e.g. 4096x4096)")
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--ms", nargs="*", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--working-set-gb", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--isa",
        default="auto",
        choices=["auto", *cpu_paths.kernel_paths()],
        help="kernel path to run (sets SPARAMX_ISA); a forced one writes kernels-<isa>.* (default: auto, kernels.*)",
    )
    args = parser.parse_args(argv)
    if args.isa != "auto":
        os.environ["SPARAMX_ISA"] = args.isa
        cpu_paths.isa()  # a path this CPU lacks fails here, before any work
    shapes = {s: tuple(int(v) for v in s.split("x")) for s in args.shapes} if args.shapes else LLAMA3_8B
    gen = torch.Generator().manual_seed(0)
    bandwidth = read_bandwidth(args.working_set_gb, args.repeats)
    rows = []
    for name, (n, k) in shapes.items():
        for sparsity in args.sparsities:
            rows += bench_shape(name, n, k, sparsity, args.ms, args.working_set_gb, args.repeats, gen)
            print(f"{name} {n}x{k} sparsity {sparsity}: done", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpu": cpu_paths.cpu_model(),
        "threads": torch.get_num_threads(),
        "isa": cpu_paths.describe_isa(),
        "torch": torch.__version__,
        "working_set_gb": args.working_set_gb,
        "repeats": args.repeats,
        "read_bandwidth_gbps": bandwidth / 1e9,
    }
    stem = "kernels" if args.isa == "auto" else f"kernels-{args.isa}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = f"CPU: {meta['cpu']}; {meta['threads']} threads; kernel path {meta['isa']}; torch {meta['torch']}\n\n"
    (out / f"{stem}.md").write_text(header + markdown(rows, bandwidth))
    plot(rows, out / f"{stem}.png", f"sparamx linears ({meta['isa']}) vs best stock torch F.linear, {meta['cpu']}")
    print(header + markdown(rows, bandwidth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
