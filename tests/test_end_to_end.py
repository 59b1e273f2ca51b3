"""The default model, the shipped recipes and real WikiText-2 text, end to end (slow: ~8 min on 2 cores)."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import sparamx
from sparamx.eval.perplexity import perplexity, token_perplexity, window_nlls
from sparamx.kernels import cpu_paths, ops
from sparamx.kernels.kv_cache import SparseKVCache
from sparamx.kernels.modules import SparseLinear
from sparamx.pipeline.artifact_format import PACKED_KEYS
from sparamx.pipeline.artifact_reader import packed_prefixes
from sparamx.pipeline.bitmap import mask_from_bitmask, unpack_reference
from sparamx.pipeline.models import load_model, load_tokenizer, resolve_model
from sparamx.pipeline.recipe import PruneConfig, Recipe, load_recipe

pytestmark = pytest.mark.slow

# A plain Wanda implementation measured 53.5 on these windows (issue #2), calibrated on 32 x 1024 C4 tokens; ours
# (recipes/wanda-50.yaml: Wanda's score, mask chosen during the refit of the kept weights) must do at least as well.
REFERENCE_WANDA_PPL = 53.5
PPL_WINDOWS = 40  # WikiText-2 windows of 1024 tokens (the README's accuracy table)
MAGNITUDE_WINDOWS = 8


@pytest.fixture(scope="module")
def wikitext(data_root) -> str:
    return (data_root / "wikitext-2-raw" / "wikitext2_test_joined.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("e2e")
    out = {}
    for name in ("wanda-50", "magnitude-50", "int8"):
        out[name] = root / name
        result = sparamx.compress("smollm2-135m", f"recipes/{name}.yaml", out=out[name], progress=False)
        print(f"{name}: {result}")
    # wanda-50-int8 as a second stage on the wanda-50 artifact (recipes/wanda-50-int8.yaml's quantize section:
    # SmoothQuant + GPTQ int8 of the same pruned weights, lm_head bf16), which spares the suite a second Wanda pass;
    # the recipe itself runs both stages at once.
    shipped = load_recipe("recipes/wanda-50-int8.yaml")
    second = Recipe(
        name="wanda-50-int8",
        prune=PruneConfig(method="magnitude", sparsity=0.0),
        quantize=shipped.quantize,
        calibration=shipped.calibration,
    )
    out["wanda-50-int8"] = root / "wanda-50-int8"
    result = sparamx.compress(str(out["wanda-50"]), second, out=out["wanda-50-int8"], progress=False)
    print(f"wanda-50-int8: {result}")
    manifest = json.loads((out["wanda-50-int8"] / "sparamx.json").read_text())
    assert manifest["recipe"]["quantize"]["method"] == "gptq" and manifest["lm_head"] is None
    return out


def test_default_artifact_is_half_sparse_in_every_row(artifacts):
    path = artifacts["wanda-50"]
    with safe_open(path / "model.safetensors", framework="pt") as fh:
        tensors = {name: (None, fh.get_tensor(name)) for name in fh.keys()}
    prefixes = packed_prefixes(tensors)
    assert len(prefixes) == 30 * 7  # every decoder linear of SmolLM2-135M; lm_head and embeddings stay dense
    assert "lm_head.shape" not in tensors and "model.embed_tokens.weight" in tensors
    for prefix in prefixes:
        assert all(f"{prefix}.{key}" in tensors for key in PACKED_KEYS)
        rows, cols = tensors[f"{prefix}.shape"][1].tolist()
        kept = mask_from_bitmask(tensors[f"{prefix}.bitmask"][1], cols).sum(dim=1).double()
        row_sparsity = 1.0 - kept / cols
        assert ((row_sparsity - 0.5).abs() <= 0.001).all(), prefix
        assert tensors[f"{prefix}.compressed"][1].dtype == torch.bfloat16


def test_loaded_artifact_matches_the_reference_reconstruction(artifacts):
    """sparamx.load(kernels=False) (C++ unpack, meta-device skeleton, re-tied head) == the source model in bf16 with
    each packed weight rebuilt by the pure-torch reference: identical logits on a real prompt."""
    path = artifacts["wanda-50"]
    reference = load_model(resolve_model("smollm2-135m"), dtype=torch.bfloat16)
    with safe_open(path / "model.safetensors", framework="pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for prefix in packed_prefixes(tensors):
            cols = int(tensors[f"{prefix}.shape"][1])
            args = [tensors[f"{prefix}.{k}"] for k in ("compressed", "bitmask", "row_offsets")]
            params[f"{prefix}.weight"].copy_(unpack_reference(*args, cols))
    model, tokenizer = sparamx.load(path, kernels=False)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(model(ids).logits, expected)


def test_kernels_are_as_accurate_as_stock_bf16(artifacts, wikitext, report, monkeypatch):
    """The default load (every packed linear on our kernels, no warning) against the same weights computed in fp32,
    next to stock transformers bf16 against the same fp32, on every SIMD path this CPU has: bf16 inference of a
    30-layer model moves logits by up to a few units (1-ulp rounding differences compound), so the kernels are held to
    torch's own bf16 error, on real text. One window of 256 tokens takes the prefill GEMM path; eight windows of 16
    take the kernels' own loops (one window of 16 is too few positions: its error alone moves by +-50% from path to
    path and artifact to artifact)."""
    path = artifacts["wanda-50"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast, tokenizer = sparamx.load(path)
    assert fast.sparamx_runtime.startswith("sparamx kernels")
    assert sum(isinstance(m, SparseLinear) for m in fast.modules()) == 30 * 7
    stock, _ = sparamx.load(path, kernels=False)
    fp32, _ = sparamx.load(path, dtype=torch.float32, kernels=False)
    ids = tokenizer(wikitext[:4000], return_tensors="pt").input_ids[:, :256]
    cases = {"256 tokens": [ids], "8 x 16 tokens": [ids[:, 16 * w : 16 * (w + 1)] for w in range(8)]}
    for case, windows in cases.items():
        logits = {}
        for prompt in windows:
            with torch.no_grad():
                logits.setdefault("fp32", []).append(fp32(prompt).logits[0, :-1].float())
                logits.setdefault("stock bf16", []).append(stock(prompt).logits[0, :-1].float())
                for isa in [p for p in cpu_paths.available_isas() if p != "reference"]:
                    monkeypatch.setenv("SPARAMX_ISA", isa)
                    logits.setdefault(isa, []).append(fast(prompt).logits[0, :-1].float())
            monkeypatch.delenv("SPARAMX_ISA")
        logits = {name: torch.cat(parts) for name, parts in logits.items()}
        target = torch.cat([prompt[0, 1:] for prompt in windows])
        nll = {name: torch.nn.functional.cross_entropy(v, target).item() for name, v in logits.items()}
        error = {name: (v - logits["fp32"]).abs().mean().item() for name, v in logits.items() if name != "fp32"}
        report(
            f"kernels vs fp32 on {case} of WikiText-2: mean |logit error| "
            + ", ".join(f"{name} {e:.4f}" for name, e in error.items())
            + "; NLL "
            + ", ".join(f"{name} {v:.4f}" for name, v in nll.items())
        )
        for name in set(error) - {"stock bf16"}:
            assert error[name] <= 1.25 * error["stock bf16"], name
            assert abs(nll[name] - nll["fp32"]) <= 0.01 * nll["fp32"], name


@pytest.fixture(scope="module")
def dense(wikitext):
    source = resolve_model("smollm2-135m")
    model, tokenizer = load_model(source, dtype=torch.float32), load_tokenizer(source)
    return model, tokenizer, token_perplexity(model, tokenizer, wikitext, 1024, PPL_WINDOWS)


def continuation_perplexity(model, prompt_ids, continuation_ids) -> float:
    ids = torch.cat([prompt_ids, continuation_ids], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, continuation_ids[0]).exp().item()


def test_loaded_artifact_completes_the_prompt(artifacts, dense, report):
    """Greedy decode through sparamx.load. The dense model answers "Paris" (so prompt and decoding are sound); the
    pruned model must produce varied text, not a repeated token. Its completion and how likely the dense model finds
    it are reported, not asserted: at 50% this 135M model no longer recalls the fact (see the README)."""
    dense_model, tokenizer, _ = dense
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    completions = {}
    for name in ("dense", "wanda-50"):
        model = dense_model if name == "dense" else sparamx.load(artifacts[name])[0]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
        completions[name] = out[:, prompt.shape[1] :]
        fluency = continuation_perplexity(dense_model, prompt, completions[name])
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        report(f"generate {name}: {text!r} (perplexity of the completion under the dense model: {fluency:.1f})")
        assert len(set(completions[name][0].tolist())) >= 6, text  # not one token repeated
    assert "Paris" in tokenizer.decode(completions["dense"][0])


def test_generate_streams_text_through_a_sparse_kv_cache(artifacts, wikitext, capsys, report):
    """`sparamx generate --kv-sparsity 0.5,0.5` on a prompt longer than the cache's dense `recent` window: the older
    tokens are packed, and the model still writes varied text."""
    from sparamx.cli import main

    prompt = wikitext[5000:7000]
    assert main(["generate", str(artifacts["wanda-50"]), "--prompt", prompt, "--kv-sparsity", "0.5,0.5"]) == 0
    out = capsys.readouterr()
    completion = out.out[len(prompt) :]
    assert out.out.startswith(prompt[:100]) and len(set(completion.split())) >= 6, completion
    assert "KV cache 0.5 / 0.5 sparse" in out.err
    report(f"generate wanda-50, KV 50%/50%: {completion.strip()[:120]!r}")
    model, tokenizer = sparamx.load(artifacts["wanda-50"], kv_sparsity=(0.5, 0.5))
    cache = SparseKVCache(model.config, model.sparamx_kv)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=2, do_sample=False)
    waiting, tile = ids.shape[1] - model.sparamx_kv.recent, ops.kv_tile()
    assert cache.layers[0].packed == waiting // tile * tile > 0  # folded at the first decode step, in whole K tiles


def test_fused_decode_step_gives_the_tokens_of_the_module_path(artifacts, wikitext, report):
    """The default load decodes through the fused step (kernels/decode_step.py: one C++ call per token runs all 30
    layers); with model.sparamx_decode_step = None the same model decodes module by module through transformers.
    Real text, the shipped int8 recipe, batch 2 with the shorter prompt left-padded: the same greedy tokens, and the
    same scores bit for bit."""
    model, tokenizer = sparamx.load(artifacts["wanda-50-int8"])
    assert model.sparamx_runtime.endswith("fused decode step")
    first, second = (tokenizer(text, return_tensors="pt").input_ids[0] for text in (wikitext[:400], wikitext[900:1200]))
    n = max(len(first), len(second))
    ids = torch.full((2, n), tokenizer.eos_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate((first, second)):
        ids[row, n - len(prompt) :], mask[row, n - len(prompt) :] = prompt, 1
    runs = []
    for step in (model.sparamx_decode_step, None):
        model.sparamx_decode_step = step
        with torch.no_grad():
            runs.append(
                model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=24,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=tokenizer.eos_token_id,
                )  # fmt: skip
            )
    fused, unfused = runs
    report(f"fused decode step, wanda-50-int8: {tokenizer.decode(fused.sequences[0, n:])!r}")
    assert torch.equal(fused.sequences, unfused.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.scores, unfused.scores, strict=True))
    assert len(set(fused.sequences[0, n:].tolist())) >= 6  # real text, not one token repeated


def test_eval_gate_passes_wanda_and_fails_magnitude_90(artifacts, tmp_path, monkeypatch, capsys, report):
    """`sparamx eval` with each recipe's own gate (>= 80% of dense on hellaswag_local and piqa_local, first 100
    examples), on hellaswag_local to keep CI short: the dense model is scored once (cached) for both artifacts."""
    from sparamx.cli import main

    monkeypatch.setenv("SPARAMX_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "magnitude-90"
    sparamx.compress("smollm2-135m", "recipes/magnitude-90.yaml", out=broken, progress=False)
    codes = {}
    for name, path in (("wanda-50", artifacts["wanda-50"]), ("magnitude-90", broken)):
        codes[name] = main(["eval", str(path), "--tasks", "hellaswag_local", "--out", str(tmp_path / "results")])
        stored = json.loads((path / "sparamx.json").read_text())["eval"]
        for row in stored["rows"]:
            report(
                f"eval {name}: {row['task']} {row['metric']} (n={row['samples']}) dense {row['dense']:.3f}, "
                f"compressed {row['compressed']:.3f}, recovery {100 * row['recovery']:.1f}%"
            )
        assert stored["gate"]["threshold"] == 0.8 and stored["limit"] == 100
    assert codes == {"wanda-50": 0, "magnitude-90": 1}
    assert "accuracy gate failed for magnitude-90" in capsys.readouterr().err


def test_perplexity_dense_beats_wanda_beats_magnitude_and_int8_keeps_it(artifacts, wikitext, dense, report):
    """bf16 artifacts are evaluated unpacked in fp32; int8 ones on the int8 kernels, the only place activations are
    quantized. Each int8 artifact must stay within 1% of its unquantized parent (issue #4). magnitude-50, an order of
    magnitude worse, is compared with wanda-50 on the first MAGNITUDE_WINDOWS windows only."""
    _, tokenizer, dense_ppl = dense
    ppl, nlls = {"dense": dense_ppl}, {}
    for name, path in artifacts.items():
        int8 = name.endswith("int8")
        model, _ = sparamx.load(path, dtype=torch.float32, kernels=int8)
        windows = MAGNITUDE_WINDOWS if name == "magnitude-50" else PPL_WINDOWS
        nlls[name] = window_nlls(model, tokenizer, wikitext, 1024, windows)
        ppl[name] = perplexity(nlls[name])
    for name, value in ppl.items():
        windows = MAGNITUDE_WINDOWS if name == "magnitude-50" else PPL_WINDOWS
        report(f"WikiText-2 token perplexity ({windows} x 1024 tokens, fp32 compute) {name}: {value:.2f}")
    report(f"(issue #2 quotes {REFERENCE_WANDA_PPL} for a plain Wanda on 32 x 1024 C4 tokens)")
    for name, parent in (("int8", "dense"), ("wanda-50-int8", "wanda-50")):
        report(f"INT8 cost {name} over {parent}: {100 * (ppl[name] / ppl[parent] - 1):+.2f}% (gate +1%)")
    assert ppl["dense"] < ppl["wanda-50"]
    assert perplexity(nlls["wanda-50"][:MAGNITUDE_WINDOWS]) < ppl["magnitude-50"]
    assert ppl["wanda-50"] < REFERENCE_WANDA_PPL  # issue #2: at least as good as a plain Wanda (refit: ~49 here)
    assert ppl["int8"] <= 1.01 * ppl["dense"]
    assert ppl["wanda-50-int8"] <= 1.01 * ppl["wanda-50"]
