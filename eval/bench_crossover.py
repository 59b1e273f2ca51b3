"""Where AMX tiles overtake the register kernels: every format on each SIMD path the CPU has (avx2, avx512, amx),
forced, beside torch bf16, by rows of x.

Weights stay in cache here (one copy, repeated calls): this sets the crossover (kAmxRows in csrc/linear.cpp), it
is no bandwidth claim (eval/bench_kernels.py is). Runs on any x86-64 CPU; the amx column needs AMX.

    python -m sparamx.eval.bench_crossover --out eval/results
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import cpu_paths, ops
from .bench_kernels import int8_rows

FORMATS = ("bitmap bf16", "bitmap int8", "dense bf16", "dense int8")


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def packed_formats(n: int, k: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    half = w * (torch.rand(n, k, generator=gen) >= 0.5)
    (q_half, s_half), (q, s) = int8_rows(half), int8_rows(w)
    bitmap, dense = torch.ops.sparamx.bitmap_linear.default, torch.ops.sparamx.dense_linear.default
    return {
        "bitmap bf16": (bitmap, ops.bitmap_prepack(*ops.bitmap_pack(half.bfloat16()), k), None),
        "bitmap int8": (bitmap, ops.bitmap_prepack(*ops.bitmap_pack(q_half), k), s_half),
        "dense bf16": (dense, ops.dense_prepack(w.bfloat16()), None),
        "dense int8": (dense, ops.dense_prepack(q), s),
    }, w.bfloat16()


def measure(threads: int, shapes, ms, repeats: int, isas) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for n, k in shapes:
        formats, dense_bf16 = packed_formats(n, k)
        for m in ms:
            x = torch.randn(m, k).bfloat16()
            row = {"threads": threads, "n": n, "k": k, "m": m}
            row["torch_bf16_ms"] = 1e3 * median_seconds(lambda: F.linear(x, dense_bf16), repeats)  # noqa: B023
            for name, (op, packed, scale) in formats.items():
                for isa in isas:
                    if isa != "amx" and name.endswith("int8") and m > 256:
                        continue  # no register blocking over M: minutes at this size, and never chosen there
                    run = lambda: op(x, *packed, n, k, scale, None, isa)  # noqa: B023, E731
                    row[f"{name} {isa}"] = 1e3 * median_seconds(run, repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows, cpu: str) -> str:
    isas = [i for i in ("avx2", "avx512", "amx") if any(f"bitmap bf16 {i}" in r for r in rows)]
    cols = [f"{f} {i}" for f in FORMATS for i in isas]
    lines = [
        f"CPU: {cpu}. Each cell: torch F.linear bf16 time / our op's time (above 1 = faster than torch), median of",
        "repeats after a warm-up, weights in cache (crossover figures, not bandwidth). 50% random bitmap or dense.",
        "",
        "| threads | N x K | M | torch bf16 ms | " + " | ".join(cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [f"{r['torch_bf16_ms'] / r[c]:.2f}x" if c in r else "—" for c in cols]
        head = f"| {r['threads']} | {r['n']}x{r['k']} | {r['m']} | {r['torch_bf16_ms']:.3f} | "
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eval/results", help="folder for crossover.json / crossover.md")
    parser.add_argument("--threads", nargs="*", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--shapes", nargs="*", default=["4096x4096", "14336x4096"], help="NxK")
    parser.add_argument("--ms", nargs="*", type=int, default=[1, 4, 8, 16, 32, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    isas = [i for i in cpu_paths.available_isas() if i != "reference"]
    if not isas:
        parser.error("this CPU has none of our SIMD paths (not even AVX2): there is nothing to measure")
    rows = [row for t in args.threads for row in measure(t, shapes, args.ms, args.repeats, isas)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_paths.cpu_model()
    (out / "crossover.json").write_text(json.dumps({"cpu": cpu, "torch": torch.__version__, "rows": rows}, indent=1))
    (out / "crossover.md").write_text(markdown(rows, cpu))
    print(markdown(rows, cpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
