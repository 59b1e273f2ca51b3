"""End-to-end decode benchmark (`make bench`, `sparamx bench`): prefill and per-token decode latency through
`model.generate`, tokens/s and peak RSS, for stock transformers (fp32, bf16) and our runtime on each recipe.

Models: the real SmolLM2-135M and a Llama-3-8B-shaped model with random weights (--layers bounds its depth; it is
magnitude-pruned, since its weights are random), or a path: a model to compress with each recipe, or an artifact or
compressed-tensors checkpoint, which the runtime "sparamx, as stored" runs as it is (stock: its decompressed
weights). Each configuration runs in a fresh process, threads pinned, so none
warms another's caches; per-token latency is the median step of one greedy generate after a short warm-up generate.
Writes bench.json, bench.md and bench.png under --out.

    python -m sparamx.eval.bench_decode --out eval/results         (make bench)
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import bench_llamacpp

RUNTIMES = {  # name -> recipe of the artifact it loads (None: stock transformers in that dtype)
    "stock fp32": None,
    "stock bf16": None,
    "sparamx dense bf16": "dense",
    "sparamx 50% bf16": "magnitude-50",
    "sparamx 50% int8": "magnitude-50-int8",  # lm_head int8 too (quantize.lm_head); the next row keeps it bf16
    "sparamx 50% int8, bf16 lm_head": "magnitude-50-int8-bf16-head",
    "sparamx int8": "int8-unsmoothed",  # lm_head bf16, as in recipes/int8.yaml
    "sparamx 50% int8, module by module": "magnitude-50-int8",
    "sparamx 50% int8, transformers KV cache": "magnitude-50-int8",
    "sparamx 50% int8, KV 50%/50%": "magnitude-50-int8",
    "sparamx, as stored": "",  # the --models entry itself: an artifact or a compressed-tensors checkpoint
}
AS_STORED = "sparamx, as stored"
# How the runtimes above that differ in the decode path alone load their artifact (the others: sparamx.load's
# defaults, which decode through the fused step on our dense KV cache and attention op).
LOAD_OPTIONS = {
    "sparamx 50% int8, module by module": {"fused_decode": False},
    "sparamx 50% int8, transformers KV cache": {"kv_cache": False},
    "sparamx 50% int8, KV 50%/50%": {"kv_sparsity": (0.5, 0.5)},
}
# recipes/int8.yaml smooths first, which needs calibration and changes weight values but neither the bytes nor the
# work of a forward: speed runs skip it.
INLINE_RECIPES = {
    "int8-unsmoothed": {"prune": {"method": "magnitude", "sparsity": 0.0}, "quantize": {"weights": "int8"}},
    "magnitude-50-int8-bf16-head": {
        "prune": {"method": "magnitude", "sparsity": 0.5},
        "quantize": {"weights": "int8", "lm_head": False},
    },
}
OURS_VS_PEERS = ("sparamx 50% int8", "sparamx 50% int8, bf16 lm_head")
MODELS = ("smollm2-135m", "llama-3-8b-shaped")
# Llama-3-8B's config (meta-llama/Meta-Llama-3-8B), depth left to --layers.
LLAMA3_8B_CONFIG = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def random_llama3_shaped(path: Path, layers: int) -> Path:
    """A Llama-3-8B-shaped model with `layers` decoder layers and random bf16 weights (normal, std = the config's
    initializer_range; norms 1), saved once to `path`. Tensors are made one at a time in bf16, straight into the
    file: no fp32 copy of the model is ever held."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..pipeline.models import load_tokenizer, resolve_model

    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B_CONFIG)
    config.dtype = torch.bfloat16
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, param in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            tensors[name] = torch.empty(param.shape, dtype=torch.bfloat16).normal_(
                0.0, config.initializer_range, generator=generator
            )
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    del tensors
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))  # any tokenizer: prompts are random token ids
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def prepare(model: str, runtimes: list[str], layers: int, cache: Path) -> dict[str, str]:
    """Source and artifact locations for `model`: builds what is missing under `cache` (reused across runs)."""
    import sparamx

    from ..pipeline.recipe import Recipe, load_recipe

    cache.mkdir(parents=True, exist_ok=True)
    source = model
    if model == "llama-3-8b-shaped":
        source = str(random_llama3_shaped(cache / f"llama-3-8b-shaped-{layers}l", layers))
    paths = {"source": source}
    for runtime in runtimes:
        if runtime in bench_llamacpp.PEERS:
            if model in bench_llamacpp.MODELS:
                quant = bench_llamacpp.PEERS[runtime]
                paths[runtime] = bench_llamacpp.gguf_for(model, quant, cache, os.cpu_count() or 1)
            continue
        recipe = RUNTIMES[runtime]
        if recipe is None:
            continue
        if runtime == AS_STORED:
            paths[runtime] = _stored(source)
            continue
        out = cache / f"{Path(source).name if '/' in source else source}-{recipe}"
        if recipe in INLINE_RECIPES:
            spec = Recipe.from_dict({"name": recipe, **INLINE_RECIPES[recipe]})
        else:
            spec = load_recipe(recipe)
        if not _cached_with(out, spec):
            sparamx.compress(source, spec, out=out, overwrite=True)
        paths[runtime] = str(out)
    return paths


def _stored(source: str) -> str:
    from ..pipeline.errors import ModelError
    from ..pipeline.models import resolve_model

    if resolve_model(source).kind != "artifact":
        raise ModelError(
            f"{AS_STORED!r} runs an artifact or compressed-tensors checkpoint as it is; {source} is neither"
        )
    return source


def _cached_with(path: Path, spec) -> bool:
    """An artifact at `path` built by this very recipe (a recipe edited since then rebuilds it)."""
    from ..pipeline.artifact_reader import read_manifest
    from ..pipeline.errors import ArtifactError

    try:
        return read_manifest(path)["recipe"] == spec.to_dict()
    except (ArtifactError, KeyError):
        return False


@functools.cache
def prompt_ids(source: str, prompt: int) -> tuple[int, ...]:
    """The batch-1 random prompt, drawn here for a peer process that has no torch (read once per source and length)."""
    from ..pipeline.models import load_config, resolve_model

    return tuple(random_prompt(load_config(resolve_model(source)).vocab_size, 1, prompt)[0].tolist())


def peak_rss_mb() -> float:
    """This process's peak resident set. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a
    fresh worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every linear's (packed, with its masks, offsets and scales, or plain) and
    lm_head's. Not the embeddings (one row a token) nor the norms."""
    import torch

    from ..kernels.modules import _PackedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, _PackedLinear):
            total += sum(t.nbytes for t in module.buffers(recurse=False) if t is not None)
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.nbytes
    return total


def worker(spec: dict) -> dict:
    """One configuration, in this (fresh) process: load, warm up, time prefill and each decode step."""
    weights = None
    if spec["runtime"] in bench_llamacpp.PEERS:
        load_s, steps = bench_llamacpp.time_generate(spec)
    else:
        load_s, steps, weights = time_generate(spec)
    decode = statistics.median(steps[1:])
    return {
        **spec,
        "weight_mb": weights / 2**20 if weights else None,
        "load_s": load_s,
        "prefill_ms": steps[0] * 1e3,
        "decode_ms_per_token": decode * 1e3,
        "tokens_per_s": spec["batch"] / decode,
        "peak_rss_mb": peak_rss_mb(),
    }


def random_prompt(vocab_size: int, batch: int, prompt: int):
    """The random prompt every runtime gets: token ids drawn with a fixed seed, clear of the vocabulary's ends."""
    import torch

    return torch.randint(100, vocab_size - 100, (batch, prompt), generator=torch.Generator().manual_seed(0))


def time_generate(spec: dict) -> tuple[float, list[float], int]:
    """Load seconds, [prefill + first token, each later token] seconds of one greedy model.generate, and the bytes of
    weights each decode step reads."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    if spec["artifact"]:
        import sparamx

        model, _ = sparamx.load(spec["artifact"], verify=False, **LOAD_OPTIONS.get(spec["runtime"], {}))
    else:
        from ..pipeline.models import load_model, resolve_model

        dtype = torch.float32 if spec["runtime"] == "stock fp32" else torch.bfloat16
        model = load_model(resolve_model(spec["source"]), dtype=dtype).eval()
    load_s = time.perf_counter() - start
    ids = random_prompt(model.config.vocab_size, spec["batch"], spec["prompt"])

    class Stamps(LogitsProcessor):  # called once per generated token, right after its forward
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def run(new_tokens, prompt):
        stamps = Stamps()
        begin = time.perf_counter()
        with torch.no_grad():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                eos_token_id=None,  # no EOS check, as the llama.cpp peer's loop: every run makes new_tokens tokens
                do_sample=False,
                logits_processor=LogitsProcessorList([stamps]),
                pad_token_id=0,
            )
        return [stamps.times[0] - begin] + [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]

    run(2, ids[:, :16])  # warm-up: kernels, allocator, thread pool (a short prompt: prefill is timed below)
    return load_s, run(spec["new_tokens"], ids), weight_bytes(model)


def run_fresh(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, "-m", "sparamx.eval.bench_decode", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**spec, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def floor_ms(row: dict, bandwidth_gbps: float | None) -> float:
    """The row's weight-bandwidth floor: the bytes of weights a decode step reads over the measured read bandwidth."""
    if not row.get("weight_mb") or not bandwidth_gbps:
        return float("nan")
    return row["weight_mb"] * 2**20 / (bandwidth_gbps * 1e9) * 1e3


def markdown(rows: list[dict], bandwidth_gbps: float | None = None) -> str:
    base = {
        (r["model"], r["batch"], r["prompt"]): r["tokens_per_s"]
        for r in rows
        if r["runtime"] == "stock bf16" and "error" not in r
    }
    lines = [
        "| model | runtime | batch | prompt | prefill ms | decode ms/token | weight floor ms | tokens/s | × stock bf16 "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['prompt']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        ratio = (
            r["tokens_per_s"] / base[key] if (key := (r["model"], r["batch"], r["prompt"])) in base else float("nan")
        )
        lines.append(
            f"{head} {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | {floor_ms(r, bandwidth_gbps):.2f} | "
            f"{r['tokens_per_s']:.1f} | "
            f"{ratio:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines + peer_ratios(rows)) + "\n"


def peer_ratios(rows: list[dict]) -> list[str]:
    """Our 50% int8 decode tokens/s (each OURS_VS_PEERS run) over each llama.cpp peer's, per model and prompt
    (batch 1)."""
    batch1 = [r for r in rows if "error" not in r and r["batch"] == 1]
    ok = {(r["model"], r["runtime"], r["prompt"]): r["tokens_per_s"] for r in batch1}
    lines = []
    for (model, runtime, prompt), peer in ok.items():
        if runtime not in bench_llamacpp.PEERS:
            continue
        for name in OURS_VS_PEERS:
            ours = ok.get((model, name, prompt))
            if ours:
                lines.append(f"- {model}, prompt {prompt}: {name} decodes at {ours / peer:.2f}x {runtime}")
    return ["", *lines] if lines else []


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r["batch"] == 1 and r["prompt"] == min(x["prompt"] for x in rows)]
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in ok if r["model"] == model]
        ax.barh([r["runtime"] for r in mine], [r["tokens_per_s"] for r in mine], color="tab:blue")
        ax.set_title(f"{model}: decode, batch 1")
        ax.set_xlabel("tokens/s")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="eval/results", help="folder for bench.json / bench.md / bench.png")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help=f"any of {', '.join(MODELS)}, or a path")
    parser.add_argument(
        "--runtimes",
        nargs="*",
        default=[r for r in RUNTIMES if r != AS_STORED]
        + (list(bench_llamacpp.PEERS) if bench_llamacpp.available() else []),
        choices=list(RUNTIMES) + list(bench_llamacpp.PEERS),
        metavar="RUNTIME",
        # argparse %-formats help strings: the runtimes' own % signs are escaped.
        help=f"any of: {'; '.join([*RUNTIMES, *bench_llamacpp.PEERS]).replace('%', '%%')} (default: all but "
        f"'{AS_STORED}', which needs --models to be an artifact or compressed-tensors checkpoint; the llama.cpp ones "
        "when llama-cpp-python is installed: make install-bench)",
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the Llama-3-8B-shaped model")
    parser.add_argument(
        "--batches", nargs="*", type=int, default=[1, 4, 16], help="batch sizes, at the shortest prompt"
    )
    parser.add_argument("--prompts", nargs="*", type=int, default=[128, 1024], help="prompt lengths (tokens)")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens per timed run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", default="artifacts/bench", help="where the benchmark's artifacts are kept")
    parser.add_argument(
        "--bandwidth-gib",
        type=float,
        default=2.0,
        help="working set of the read-bandwidth measurement behind the weight floor column (0: skip it)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv=None, prog=None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    bandwidth = measured_bandwidth(args.threads, args.bandwidth_gib) if args.bandwidth_gib > 0 else None
    rows = run_all(args)
    write_results(rows, args, bandwidth)
    return 0


def measured_bandwidth(threads: int, working_set_gib: float) -> float:
    """Read bandwidth in GB/s with the runs' thread count: bench_kernels' fp32 sum over a rotating working set."""
    import torch

    from .bench_kernels import read_bandwidth

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return read_bandwidth(working_set_gib, 3) / 1e9
    finally:  # main() may run in a caller's process (the tests): leave its thread count as it was
        torch.set_num_threads(before)


def run_all(args) -> list[dict]:
    """Each model x (batch, prompt) x runtime in a fresh process: batch sizes at the shortest prompt, and every
    prompt length at batch 1."""
    shapes = sorted({(b, min(args.prompts)) for b in args.batches} | {(1, p) for p in args.prompts})
    rows = []
    for model in args.models:
        paths = prepare(model, args.runtimes, args.layers, Path(args.cache))
        for batch, prompt in shapes:
            for runtime in args.runtimes:
                if runtime in bench_llamacpp.PEERS and (batch != 1 or runtime not in paths):
                    continue  # the peer runs batch 1 on models that ship a GGUF
                spec = {
                    "model": model,
                    "runtime": runtime,
                    "source": paths["source"],
                    "artifact": paths.get(runtime),
                    "batch": batch,
                    "prompt": prompt,
                    "new_tokens": args.new_tokens,
                    "threads": args.threads,
                }
                if runtime in bench_llamacpp.PEERS:
                    spec["prompt_ids"] = prompt_ids(paths["source"], prompt)
                rows.append(run_fresh(spec))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def write_results(rows: list[dict], args, bandwidth_gbps: float | None = None) -> None:
    from ..kernels import cpu_paths

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peers = [r for r in args.runtimes if r in bench_llamacpp.PEERS]
    meta = {
        "peer": bench_llamacpp.describe() if peers else "llama.cpp peer not run (make install-bench, then make bench)",
        "cpu": cpu_paths.cpu_model(),
        "kernel_path": cpu_paths.describe_isa(),
        "threads": args.threads,
        "layers_of_8b_shaped": args.layers,
        "new_tokens": args.new_tokens,
        "read_bandwidth_gbps": bandwidth_gbps,
    }
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (
        f"CPU: {meta['cpu']}; kernel path {meta['kernel_path']}; {args.threads} threads, "
        "each configuration in a fresh process; "
        f"Llama-3-8B-shaped model with {args.layers} layers; {args.new_tokens} new tokens per run. {meta['peer']}\n"
        + (
            f"Weight floor: the weights a decode step reads over the measured read bandwidth, {bandwidth_gbps:.1f} "
            "GB/s.\n\n"
            if bandwidth_gbps
            else "\n"
        )
    )
    table = markdown(rows, bandwidth_gbps)
    (out / "bench.md").write_text(header + table)
    plot(rows, out / "bench.png")
    print(header + table)


if __name__ == "__main__":
    raise SystemExit(main())
