"""`sparamx` command line: prune | recipes | inspect | generate | eval | info | bench.
Fixable errors: one line, exit 2."""

import argparse
import json
import sys
import time

from . import __version__
from .pipeline.errors import SparamxError
from .pipeline.recipe import DEFAULT_RECIPE, shipped_recipes

EPILOG = """examples:
  sparamx recipes
  sparamx prune --model smollm2-135m --recipe wanda-50
  sparamx prune --model meta-llama/Meta-Llama-3-8B --recipe wanda-2of4 --out artifacts/llama3-2of4
  sparamx prune --model smollm2-135m --recipe my-recipe.yaml
  sparamx inspect artifacts/smollm2-135m-wanda-50
  sparamx generate artifacts/smollm2-135m-wanda-50 --prompt "The capital of France is"
  sparamx generate artifacts/smollm2-135m-wanda-50 --chat --prompt "What is the capital of France?"
  sparamx generate artifacts/smollm2-135m-wanda-50 --kv-sparsity 0.5,0.5 --prompt "The capital of France is"
  sparamx eval artifacts/smollm2-135m-wanda-50 --limit 200
  accelerate launch --multi_gpu --num_processes 2 -m sparamx.cli eval artifacts/smollm2-135m-wanda-50  # CPU, gloo
"""


def cmd_prune(args) -> int:
    from .pipeline.runner import compress

    report = compress(
        args.model, args.recipe, out=args.out, calib=args.calib, overwrite=args.overwrite, progress=not args.quiet
    )
    from .user_cache import remember_artifact

    remember_artifact(report["out"])
    t = report["timings"]
    print(
        f"wrote {report['out']}: {report['packed']}/{report['linears']} linears packed, "
        f"{100 * report['sparsity']:.2f}% sparse; prune {t['prune_s']:.0f}s, total {sum(t.values()):.0f}s"
    )
    return 0


def _inspect_row(row: dict) -> str:
    shape = "x".join(str(s) for s in row["shape"])
    return (
        f"{row['name']:<44} {row['kind']:<7} {shape:>12} {100 * row['sparsity']:>8.2f}% {row['nnz']:>10} "
        f"{row['bytes']:>11} {row['bits_per_weight']:>7.2f}"
    )


def cmd_inspect(args) -> int:
    from .eval.inspect_artifact import artifact_table

    table, totals = artifact_table(args.path)
    if args.json:
        print(json.dumps({"layers": table, "totals": totals}, indent=2))
        return 0
    header = f"{'layer':<44} {'kind':<7} {'shape':>12} {'sparsity':>9} {'nnz':>10} {'bytes':>11} {'bits/w':>7}"
    print(header)
    print("-" * len(header))
    for row in table:
        print(_inspect_row(row))
    print("-" * len(header))
    print(
        f"{'total linears':<44} {'':<7} {totals['params']:>12} {100 * totals['sparsity']:>8.2f}% "
        f"{totals['nnz']:>10} {totals['bytes']:>11} {totals['bits_per_weight']:>7.2f}"
    )
    if totals["lm_head"]:
        print(_inspect_row(totals["lm_head"]) + "  (int8, not pruned)")
    print(
        f"artifact: {totals['files_bytes'] / 2**20:.1f} MiB on disk in {totals['files']} safetensors file(s); "
        f"source {totals['source']}; recipe {totals['recipe']}"
    )
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from . import load

    model, tokenizer = load(
        args.path,
        kv_sparsity=args.kv_sparsity,
        kv_cache=False if args.no_kv_cache else None,
        fused_decode=False if args.no_fused_decode else None,
    )
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    new = out.shape[1] - ids.input_ids.shape[1]
    seconds = time.perf_counter() - start
    kv = getattr(model, "sparamx_kv", None)
    cache = f"KV cache {kv.k_sparsity:g} / {kv.v_sparsity:g} sparse" if kv else "transformers' KV cache"
    print(
        f"[{new} tokens in {seconds:.2f}s, {new / seconds:.1f} tokens/s; {model.sparamx_runtime}; {cache}]",
        file=sys.stderr,
    )
    return 0


def cmd_eval(args) -> int:
    from .eval.accuracy import GateError, markdown, run_eval

    if args.kv_sparsity is not None:
        raise SparamxError(
            "--kv-sparsity: lm-eval's loglikelihood and perplexity requests are one dense prefill each and never read "
            "the KV cache, so its sparsity cannot change these scores; `make kv-accuracy` (python -m "
            "sparamx.eval.kv_accuracy) measures its cost in teacher-forced decode"
        )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        report = run_eval(
            args.path,
            tasks=tasks,
            limit=args.limit,
            docs=args.docs,
            threshold=args.threshold,
            dense=not args.no_dense,
            batch_size=args.batch_size,
            out=args.out,
        )
    except GateError as exc:
        print(f"sparamx: {exc}", file=sys.stderr)
        return 1
    if report is not None:  # rank 0 of a data-parallel run, or the only process
        print(markdown(report), end="")
        written = ", ".join(report.get("written", []))
        print(f"wrote {written} and the artifact's sparamx.json ({report['seconds']:.0f}s)")
    return 0


def cmd_info(args) -> int:
    import torch

    from .kernels import cpu_paths

    features = cpu_paths.cpu_features()
    print(f"sparamx {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"cpu: {cpu_paths.cpu_model()}; torch's kernels: {torch.backends.cpu.get_cpu_capability()}")
    print("cpu features: " + (", ".join(features) or "none of interest"))
    for path in cpu_paths.kernel_paths():
        missing = cpu_paths.missing_features(path)
        print(f"  {path:<9} {'available' if not missing else 'needs ' + missing}")
    print(f"kernel paths available: {', '.join(cpu_paths.available_isas())}; chosen: {cpu_paths.describe_isa()}")
    gemm = cpu_paths.int8_gemm_rows()
    print(
        f"int8 prefill on avx512: torch's int8 GEMM from {gemm} rows of x"
        if gemm
        else "int8 prefill on avx512: our kernel (torch's int8 GEMM is not exact in this process)"
    )
    runs_on = "our kernels" if cpu_paths.kernels_preferred() else "torch, unpacked (SPARAMX_ISA=reference runs ours)"
    print(f"sparamx.load runs packed linears on {runs_on}")
    if "amx_tile" not in features:
        print("AMX: not available to this process (no amx_tile in cpuid, or arch_prctl refused tile data)")
    return 0


def cmd_recipes(args) -> int:
    from .pipeline.recipe import load_recipe

    for name, path in sorted(shipped_recipes().items()):
        default = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name:<18} {load_recipe(path).description}{default}")
    return 0


def add_prune(sub) -> None:
    prune = sub.add_parser("prune", help="prune a model with a recipe and write an artifact directory")
    prune.add_argument(
        "--model",
        default="smollm2-135m",
        help="alias (smollm2-135m, llama-3-8b, llama-3.1-8b, llama-2-7b), hub id, model directory "
        "or .gguf file (default: smollm2-135m, works offline)",
    )
    prune.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"a recipe YAML file, or a shipped recipe's name: {', '.join(sorted(shipped_recipes()))} "
        "(default: %(default)s; `sparamx recipes` describes them)",
    )
    prune.add_argument("--out", help="artifact directory (default: artifacts/<model>-<recipe>)")
    prune.add_argument(
        "--calib",
        help="calibration text: a .jsonl/.txt file or folder (default: the recipe's "
        "dataset under $SPARAMX_DATA, else from the dataset hub)",
    )
    prune.add_argument("--overwrite", action="store_true", help="replace an existing artifact (atomically)")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    prune.set_defaults(func=cmd_prune)


def add_inspect_and_generate(sub) -> None:
    inspect = sub.add_parser("inspect", help="per-layer table of an artifact: shape, sparsity, nnz, bytes")
    inspect.add_argument("path", help="artifact directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(func=cmd_inspect)

    generate = sub.add_parser("generate", help="load an artifact and complete a prompt (greedy)")
    generate.add_argument("path", help="artifact directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_kv_options(generate)
    generate.set_defaults(func=cmd_generate)


def kv_sparsity_arg(text: str) -> tuple[float, float]:
    from .pipeline.kv_sparsity import parse_kv_sparsity

    try:
        return parse_kv_sparsity(text)
    except SparamxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_kv_options(parser) -> None:
    parser.add_argument(
        "--kv-sparsity",
        type=kv_sparsity_arg,
        metavar="K,V",
        help="fraction of each cached K and V vector dropped in generation, e.g. 0.5,0.5; 0,0 is our dense cache "
        "(default: the artifact's recipe, else 0,0)",
    )
    parser.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="decode with transformers' own KV cache and attention instead (and so module by module)",
    )
    parser.add_argument(
        "--no-fused-decode",
        action="store_true",
        help="decode module by module through transformers instead of one C++ call per token (the same tokens; "
        "slower: for debugging)",
    )


def add_eval(sub) -> None:
    evaluate = sub.add_parser(
        "eval",
        help="lm-eval accuracy of an artifact vs its dense source model, with the recipe's gate",
        description="Run lm-eval on the artifact (our kernels) and on the dense model it came from; print and write "
        "the comparison (eval/results/eval-<artifact>.{json,md} and the artifact's sparamx.json). Exits 1 when a "
        "metric recovers less than the recipe's eval.recovery_threshold (or --threshold).",
    )
    evaluate.add_argument("path", nargs="?", help="artifact directory (default: the one `sparamx prune` wrote last)")
    evaluate.add_argument(
        "--tasks",
        help="comma-separated lm-eval tasks (default: the recipe's eval.tasks, else every offline task in "
        "eval/tasks: wikitext_local, arc_easy_local, ...; hub task names need the network)",
    )
    evaluate.add_argument("--limit", type=int, help="examples per task (default: the recipe's eval.limit, else all)")
    evaluate.add_argument(
        "--docs",
        type=int,
        help="documents per perplexity task such as wikitext_local (an article is thousands of tokens; "
        "default: the recipe's eval.docs, else as --limit)",
    )
    evaluate.add_argument("--threshold", type=float, help="recovery gate in (0, 1] (default: the recipe's)")
    evaluate.add_argument("--batch-size", type=int, default=4, help="lm-eval batch size (default: %(default)s)")
    evaluate.add_argument("--no-dense", action="store_true", help="skip the dense model (no recovery, no gate)")
    evaluate.add_argument(
        "--kv-sparsity",
        type=kv_sparsity_arg,
        metavar="K,V",
        help="refused, with the reason: these tasks never read the KV cache (make kv-accuracy measures its cost)",
    )
    evaluate.add_argument(
        "--out", default="eval/results", help="folder for the JSON and markdown (default: %(default)s)"
    )
    evaluate.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparamx",
        description="Compress causal LMs for fast CPU decoding and run the result.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_prune(sub)
    sub.add_parser("recipes", help="the shipped recipes, one line each").set_defaults(func=cmd_recipes)
    add_inspect_and_generate(sub)
    add_eval(sub)
    sub.add_parser("info", help="CPU features detected and the kernel path chosen").set_defaults(func=cmd_info)
    # Listed here for --help; its options are bench_decode's own (main() hands them over untouched).
    sub.add_parser("bench", help="decode benchmark: stock transformers vs our runtime per recipe (see bench --help)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .eval.bench_decode import main as bench_main

        return bench_main(argv[1:], prog="sparamx bench")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SparamxError as exc:
        print(f"sparamx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparamx: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
