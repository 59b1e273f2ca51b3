"""Checkpoints that compressed-tensors itself writes (ModelCompressor of compressed-tensors 0.20: int-quantized W8A8;
its DenseSparsityConfig for zeros stored in place), loaded by sparamx.load onto our kernels and compared with the
same checkpoint as transformers + compressed-tensors run it (decompressed, activations fake-quantized)."""

import json
import shutil
from pathlib import Path

import compressed_tensors
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file

import sparamx
from sparamx.kernels.modules import DenseLinear, SparseLinear
from sparamx.pipeline.errors import ArtifactError


def weights_only(bits: int, strategy: str, group_size: int | None = None) -> QuantizationScheme:
    args = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group_size, symmetric=True)
    return QuantizationScheme(targets=["Linear"], weights=args)


W8A16_CHANNEL = weights_only(8, "channel")


def prune_2of4(model) -> None:
    """Magnitude 2:4 on every decoder linear, in place (the zeros are what a sparse checkpoint stores)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
                w = linear.weight.view(linear.out_features, -1, 4)
                drop = w.abs().argsort(dim=-1)[..., :2]
                w.scatter_(-1, drop, 0.0)


def write_checkpoint(model, tokenizer, path, scheme=None, sparsity_structure=None, quantization_format=None):
    """save_pretrained of `model` through compressed-tensors: with `scheme` (a preset name or a QuantizationScheme),
    its weight scales from each weight's min/max (calculate_qparams) and ModelCompressor's compression (in the format
    it infers, or `quantization_format`); with `sparsity_structure`, a DenseSparsityConfig in the
    quantization_config."""
    compressor = None
    if scheme is not None:
        scheme = preset_name_to_scheme(scheme, ["Linear"]) if isinstance(scheme, str) else scheme
        apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight.detach().float()
                scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), scheme.weights)
                module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format)
        compressor.compress_model(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if compressor is not None:
        compressor.update_config(path)
    if sparsity_structure is not None:
        config = json.loads((path / "config.json").read_text())
        fresh = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__}
        quant = config.setdefault("quantization_config", fresh)
        quant["sparsity_config"] = SparsityCompressionConfig.load_from_registry(
            "dense", sparsity_structure=sparsity_structure, targets=["Linear"], ignore=["lm_head"]
        ).model_dump()
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def tiny_source(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_source, smol_tokenizer):
    root = tmp_path_factory.mktemp("compressed-tensors")
    out = {}
    for name, scheme, sparse in (
        ("w8a8", "W8A8", False),
        ("2of4", None, True),
        ("2of4-w8a8", "W8A8", True),
        ("w8a16", W8A16_CHANNEL, False),  # its inferred format packs int8 into int32 (pack-quantized): forced here
    ):
        model = tiny_source()
        if sparse:
            prune_2of4(model)
        fmt = "int-quantized" if name == "w8a16" else None
        out[name] = write_checkpoint(model, smol_tokenizer, root / name, scheme, "2:4" if sparse else None, fmt)
    return out


def reference_logits(path, ids) -> torch.Tensor:
    """The checkpoint as transformers + compressed-tensors run it (CompressedTensorsHfQuantizer: decompressed on the
    first forward, activations fake-quantized as the scheme says)."""
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    if not config["quantization_config"].get("config_groups"):  # sparsity alone: the stored weights as they are
        plain = path.parent / f"{path.name}-plain"
        shutil.copytree(path, plain, dirs_exist_ok=True)
        del config["quantization_config"]
        (plain / "config.json").write_text(json.dumps(config))
        path = plain
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize(
    "name, linear_type, dtype",
    [
        ("w8a8", DenseLinear, "int8"),
        ("2of4", SparseLinear, "bfloat16"),
        ("2of4-w8a8", SparseLinear, "int8"),
        ("w8a16", DenseLinear, "bfloat16"),
    ],
)
def test_a_compressed_tensors_checkpoint_runs_on_our_kernels(checkpoints, name, linear_type, dtype):
    path = checkpoints[name]
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = reference_logits(path, ids)
    if name == "w8a16":
        with pytest.warns(UserWarning, match="W8A16"):
            model, _ = sparamx.load(path, kernels=True)
    else:
        model, _ = sparamx.load(path, kernels=True)
    assert isinstance(model.model.layers[0].mlp.down_proj, linear_type)
    assert {layer["dtype"] for layer in model.sparamx_manifest["layers"]} == {dtype}
    with torch.no_grad():
        got = model(ids).logits.float()
        unpacked = sparamx.load(path, kernels=False)[0](ids).logits.float()
    scale = expected.abs().mean()
    # bf16 kernels: torch's own bf16 rounding differences; int8: activations quantized per token with a zero point
    # (ours) against symmetric (the checkpoint's scheme), a few 1e-2 of the logits' scale on this random model.
    limit = 0.08 if dtype == "int8" else 0.02
    assert (got - expected).abs().mean() <= limit * scale, name
    assert (unpacked - expected).abs().mean() <= limit * scale, name


def test_sparsity_is_packed_only_where_the_config_targets_it(checkpoints, tmp_path):
    """The dense format's zeros become bitmaps (2:4 is 50%, past the bitmap threshold); with the layers listed in
    ignore they stay dense."""
    path = tmp_path / "ignored"
    shutil.copytree(checkpoints["2of4"], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["sparsity_config"]["ignore"] = ["lm_head", "re:.*mlp.*"]
    (path / "config.json").write_text(json.dumps(config))
    model, _ = sparamx.load(path, kernels=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SparseLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, DenseLinear)
    records = {r["name"]: r for r in model.sparamx_manifest["layers"]}
    assert records["model.layers.1.self_attn.o_proj.weight".removesuffix(".weight")]["kind"] == "bitmap"
    assert records["model.layers.1.mlp.down_proj"]["kind"] == "dense"


@pytest.mark.parametrize(
    "scheme, message",
    [
        (weights_only(4, "group", 8), "format pack-quantized, weights int4 group 8 symmetric"),
        (weights_only(8, "group", 8), "weights int8 group 8 symmetric"),
        (W8A16_CHANNEL, "format pack-quantized, weights int8 channel symmetric"),
        ("FP8_DYNAMIC", "weights float8 channel symmetric"),
    ],
)
def test_an_unsupported_scheme_is_one_line_naming_it(tiny_source, smol_tokenizer, tmp_path, scheme, message):
    path = write_checkpoint(tiny_source(), smol_tokenizer, tmp_path / "checkpoint", scheme)
    with pytest.raises(ArtifactError, match="supported: int-quantized W8A8") as info:
        sparamx.load(path)
    assert message in str(info.value) and "config.json: quantization_config.config_groups.group_0" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_broken_checkpoint_names_the_file_or_tensor(checkpoints, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["w8a8"], bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ArtifactError, match="tensor model.layers.1.mlp.up_proj.weight_scale is missing"):
        sparamx.load(bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="model.safetensors: corrupt safetensors file"):
        sparamx.load(bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["sparsity_config"] = {"format": "marlin-24", "sparsity_structure": "2:4"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="sparsity_config: format .marlin-24. is not supported"):
        sparamx.load(bad)
    for key, value, message in (
        ("transform_config", {"config_groups": {"u": {"type": "hadamard"}}}, "transform_config is not supported"),
        ("calibration_hash", "abc", "unknown key 'calibration_hash'"),
    ):
        broken = {**config, "quantization_config": {**config["quantization_config"], key: value, "sparsity_config": {}}}
        (bad / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ArtifactError, match=message):
            sparamx.load(bad)
    (bad / "model.safetensors").unlink()
    config["quantization_config"]["sparsity_config"] = {}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        sparamx.load(bad)


@pytest.fixture(scope="module")
def smollm2_w8a8(tmp_path_factory):
    """SmolLM2-135M quantized W8A8 by compressed-tensors (decoder linears; lm_head kept): (path, theirs, ours,
    tokenizer), theirs the checkpoint as transformers + compressed-tensors run it."""
    from transformers import AutoModelForCausalLM

    from sparamx.pipeline.models import load_model, load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-w8a8"
    write_checkpoint(load_model(source, dtype=torch.bfloat16), tokenizer, path, "W8A8")
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours, _ = sparamx.load(path)
    return path, theirs, ours, tokenizer


def greedy(model, tokenizer, prompt: str, tokens: int) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1] :]


@pytest.mark.slow
def test_smollm2_w8a8_by_compressed_tensors_reads_real_text_as_it_does(smollm2_w8a8, data_root, report):
    """On real WikiText-2 text our int8 kernels give the checkpoint's NLL within 1%, and the answer to a real prompt
    (its first 5 greedy tokens) is the same."""
    _, theirs, ours, tokenizer = smollm2_w8a8
    assert ours.sparamx_runtime.startswith("sparamx kernels")
    assert isinstance(ours.model.layers[0].mlp.down_proj, DenseLinear)
    text = (data_root / "wikitext-2-raw" / "wikitext2_test_joined.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[:6000], return_tensors="pt").input_ids[:, :512]
    nll = {}
    with torch.no_grad():
        for name, model in (("compressed-tensors", theirs), ("sparamx", ours)):
            logits = model(ids).logits[0, :-1].float()
            nll[name] = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    report(
        "SmolLM2 W8A8 by compressed-tensors, NLL on 512 WikiText-2 tokens: "
        + ", ".join(f"{k} {v:.4f}" for k, v in nll.items())
    )
    assert abs(nll["sparamx"] - nll["compressed-tensors"]) <= 0.01 * nll["compressed-tensors"]
    answers = [greedy(m, tokenizer, "The capital of France is", 5) for m in (theirs, ours)]
    assert torch.equal(*answers), [tokenizer.decode(a) for a in answers]


@pytest.mark.slow
def test_smollm2_w8a8_by_compressed_tensors_continues_a_prompt_token_for_token(smollm2_w8a8):
    """12 greedy tokens, the same, in fp32: there both sides compute the checkpoint's W8A8 (symmetric activations per
    token) without rounding products to bf16. (In bf16 each side rounds differently, ours the exact integer dot
    products, theirs the fake-quantized values: on this prompt the two part at the 6th token, a 0.9-logit margin.)"""
    from transformers import AutoModelForCausalLM

    path, _, _, tokenizer = smollm2_w8a8
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, _ = sparamx.load(path, dtype=torch.float32)
    assert ours.model.layers[0].mlp.down_proj.x_symmetric
    answers = [greedy(m, tokenizer, "The capital of France is", 12) for m in (theirs, ours)]
    assert torch.equal(*answers), [tokenizer.decode(a) for a in answers]


@pytest.mark.slow
def test_smollm2_2of4_in_the_dense_format_reads_real_text_as_torch_does(tmp_path, data_root, report):
    """SmolLM2-135M magnitude-pruned 2:4, stored dense with compressed-tensors' DenseSparsityConfig: every decoder
    linear on our bitmap kernels, the NLL of the stored weights in plain torch bf16 within 1%, and in fp32 the same
    12 greedy tokens of a real prompt. (2:4 by magnitude leaves this small model near ties: in bf16, torch's own
    rounding already departs from its fp32 tokens at the 8th.)"""
    from transformers import AutoModelForCausalLM

    from sparamx.pipeline.models import load_model, load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=torch.bfloat16)
    prune_2of4(model)
    path = write_checkpoint(model, tokenizer, tmp_path / "smollm2-2of4", sparsity_structure="2:4")
    del model
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    theirs = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16).eval()
    ours, _ = sparamx.load(path)
    assert (
        all(r["kind"] == "bitmap" for r in ours.sparamx_manifest["layers"])
        and len(ours.sparamx_manifest["layers"]) == 210
    )
    text = (data_root / "wikitext-2-raw" / "wikitext2_test_joined.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[:6000], return_tensors="pt").input_ids[:, :512]
    nll = {}
    with torch.no_grad():
        for name, model in (("torch", theirs), ("sparamx", ours)):
            nll[name] = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:]).item()
    report(
        "SmolLM2 2:4 (dense format + sparsity_config), NLL on 512 WikiText-2 tokens: "
        + ", ".join(f"{k} {v:.4f}" for k, v in nll.items())
    )
    assert abs(nll["sparamx"] - nll["torch"]) <= 0.01 * nll["torch"]
    theirs, ours = theirs.float(), sparamx.load(path, dtype=torch.float32)[0]
    answers = [greedy(m, tokenizer, "The capital of France is", 12) for m in (theirs, ours)]
    assert torch.equal(*answers), [tokenizer.decode(a) for a in answers]


def test_a_checkpoint_is_a_source_for_our_stages_and_the_cli(checkpoints, tmp_path, monkeypatch, capsys):
    """`sparamx prune --model <checkpoint>` (INT8 on top of a 2:4 model keeps its zeros), `sparamx inspect` and
    `sparamx eval` (its own decompressed weights as the dense reference; nothing written into the checkpoint)."""
    from sparamx.cli import main

    out = tmp_path / "2of4-int8"
    assert main(["prune", "--model", str(checkpoints["2of4"]), "--recipe", "int8", "--out", str(out), "--quiet"]) == 0
    layers = json.loads((out / "sparamx.json").read_text())["layers"]
    assert {(r["kind"], r["dtype"]) for r in layers} == {("bitmap", "int8")}
    assert all(abs(r["sparsity"] - 0.5) < 1e-9 for r in layers)
    capsys.readouterr()
    assert main(["inspect", str(checkpoints["2of4-w8a8"])]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj" in table and "bitmap" in table and "compressed-tensors" in table
    monkeypatch.setenv("SPARAMX_CACHE", str(tmp_path / "cache"))
    before = sorted(p.name for p in checkpoints["w8a8"].iterdir())
    args = ["eval", str(checkpoints["w8a8"]), "--tasks", "piqa_local", "--limit", "4", "--threshold", "0.01"]
    assert main([*args, "--out", str(tmp_path / "results")]) == 0
    report = json.loads((tmp_path / "results" / "eval-w8a8.json").read_text())
    assert {row["task"] for row in report["rows"]} == {"piqa_local"} and report["rows"][0]["dense"] is not None
    assert sorted(p.name for p in checkpoints["w8a8"].iterdir()) == before


def test_a_hub_id_the_machine_cannot_reach_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ArtifactError, match="RedHatAI/Sparse-Llama-3.1-8B-2of4: no such directory, and the hub"):
        sparamx.load("RedHatAI/Sparse-Llama-3.1-8B-2of4")


LEGACY = Path(__file__).parent / "fixtures" / "compressed-tensors-0.14"


@pytest.mark.parametrize(
    "name, dtype",
    [("sparse-bitmask", "bfloat16"), ("sparse-24-bitmask", "bfloat16"), ("sparse-24-bitmask-w8a8", "int8")],
)
def test_legacy_sparse_formats_written_by_compressed_tensors_0_14(name, dtype, tmp_path, smol_tokenizer):
    """Checkpoints that compressed-tensors 0.14.0 wrote (tests/fixtures/write_legacy_sparse.py; later releases dropped
    these compressors): every linear on our bitmap kernels, with the logits of the weights 0.14 decompresses them to
    (decompressed.safetensors) run by plain torch."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path / name
    shutil.copytree(LEGACY / name, path)
    smol_tokenizer.save_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    missing, unexpected = reference.load_state_dict(load_file(path / "decompressed.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    reference.tie_weights()
    ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    model, _ = sparamx.load(path, kernels=True)
    layers = model.sparamx_manifest["layers"]
    assert len(layers) == 14 and {(r["kind"], r["dtype"]) for r in layers} == {("bitmap", dtype)}
    assert all(isinstance(model.get_submodule(r["name"]), SparseLinear) for r in layers)
    with torch.no_grad():
        expected = reference(ids).logits.float()
        got = model(ids).logits.float()
        unpacked = sparamx.load(path, kernels=False)[0](ids).logits.float()
    limit = 0.08 if dtype == "int8" else 0.02
    assert (got - expected).abs().mean() <= limit * expected.abs().mean()
    assert (unpacked - expected).abs().mean() <= limit * expected.abs().mean()


def test_bench_runs_a_checkpoint_as_stored_beside_stock(checkpoints, tmp_path):
    from sparamx.eval.bench_decode import main as bench
    from sparamx.pipeline.errors import ModelError

    args = ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--models", str(checkpoints["2of4"])]
    args += ["--batches", "1", "--prompts", "8", "--new-tokens", "3", "--threads", "1", "--bandwidth-gib", "0"]
    assert bench([*args, "--runtimes", "stock bf16", "sparamx, as stored"]) == 0
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [(r["runtime"], r.get("error")) for r in rows] == [("stock bf16", None), ("sparamx, as stored", None)]
    assert rows[1]["artifact"] == str(checkpoints["2of4"]) and rows[1]["weight_mb"] < rows[0]["weight_mb"]
    with pytest.raises(ModelError, match="runs an artifact or compressed-tensors checkpoint as it is"):
        bench([*args[:5], "smollm2-135m", *args[6:], "--runtimes", "sparamx, as stored"])
