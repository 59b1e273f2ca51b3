import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparamx
from sparamx.eval.inspect_artifact import artifact_table
from sparamx.kernels import cpu_paths
from sparamx.kernels.modules import DenseLinear, SparseLinear
from sparamx.pipeline import artifact_writer
from sparamx.pipeline.artifact_format import MANIFEST, sha256_file
from sparamx.pipeline.errors import ArtifactError
from sparamx.pipeline.layerwise import prune_layerwise
from sparamx.pipeline.models import load_model, resolve_model
from sparamx.pipeline.quantize import dequantize, quantize_per_channel, sqnr_db
from sparamx.pipeline.recipe import PruneConfig, QuantizeConfig, Recipe, load_recipe

MAGNITUDE = Recipe(name="magnitude-50", prune=PruneConfig(method="magnitude", sparsity=0.5))
PREFIX = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "tiny-magnitude-50"
    report = sparamx.compress(str(tiny_model_dir), MAGNITUDE, out=out, progress=False)
    assert report["packed"] == report["linears"] == 14
    return out


@pytest.fixture
def copy_of(tiny_artifact, tmp_path):
    import shutil

    def make() -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(tiny_artifact, dst)
        return dst

    return make


def rewrite_tensors(path: Path, edit) -> None:
    """Apply `edit` to the stored tensors and re-sign the file, so only the tensor check can catch the damage."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["model.safetensors"]["sha256"] = sha256_file(file)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_v1_names_dtypes_and_manifest(tiny_artifact):
    tensors = load_file(tiny_artifact / "model.safetensors")
    assert tensors[f"{PREFIX}.shape"].dtype == torch.int64 and tensors[f"{PREFIX}.shape"].tolist() == [136, 64]
    assert tensors[f"{PREFIX}.compressed"].dtype == torch.bfloat16 and tensors[f"{PREFIX}.compressed"].dim() == 1
    assert tensors[f"{PREFIX}.bitmask"].dtype == torch.uint8 and tensors[f"{PREFIX}.bitmask"].shape == (136, 8)
    assert tensors[f"{PREFIX}.row_offsets"].dtype == torch.int64 and tensors[f"{PREFIX}.row_offsets"][0] == 0
    assert f"{PREFIX}.weight" not in tensors and "lm_head.weight" not in tensors  # tied to the embeddings
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((tiny_artifact / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["sparsity_config"]["format"] == "sparse-bitmask"
    assert abs(qc["sparsity_config"]["global_sparsity"] - 0.5) < 1e-3
    manifest = json.loads((tiny_artifact / MANIFEST).read_text())
    assert manifest["format"] == "sparamx-artifact" and manifest["format_version"].startswith("1.")
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(tiny_artifact / "model.safetensors")
    assert manifest["recipe"]["name"] == "magnitude-50" and len(manifest["layers"]) == 14
    assert all(layer["sparsity"] == 0.5 for layer in manifest["layers"])
    assert not list(tiny_artifact.parent.glob(".*tmp-*"))


def test_load_reproduces_the_pruned_model(tiny_artifact, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sparamx.pipeline.layerwise import prune_layerwise

    pruned = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prune_layerwise(pruned, MAGNITUDE.prune, None, progress=False)
    # Built as transformers builds a bf16 model (its rotary buffers stay fp32), then given the pruned weights.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    reference.load_state_dict({k: v.to(torch.bfloat16) for k, v in pruned.state_dict().items()})
    model, tokenizer = sparamx.load(tiny_artifact, kernels=False)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(model(ids).logits, expected)
        # On the kernels: same bf16 operands and fp32 sums, so only summation order and bf16 output rounding differ.
        fast, _ = sparamx.load(tiny_artifact, kernels=True)
        assert sum(isinstance(m, SparseLinear) for m in fast.modules()) == 14
        torch.testing.assert_close(fast(ids).logits, expected, rtol=1.6e-2, atol=1e-2)
    assert fast.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize(
    "isas, forced, on_kernels",
    [
        (("reference", "avx2"), "", True),
        (("reference", "avx2", "avx512"), "", True),
        (("reference", "avx2", "avx512", "amx"), "", True),
        (("reference",), "", False),  # not even AVX2: torch on unpacked weights, with a warning
        (("reference",), "reference", True),  # a forced path is honoured
    ],
)
def test_default_load_picks_kernels_where_the_cpu_runs_them(tiny_artifact, monkeypatch, isas, forced, on_kernels):
    monkeypatch.setattr(cpu_paths, "available_isas", lambda: isas)
    monkeypatch.setenv("SPARAMX_ISA", forced)
    if on_kernels:
        model, _ = sparamx.load(tiny_artifact)
        assert model.sparamx_runtime.startswith("sparamx kernels")
    else:
        with pytest.warns(UserWarning, match="cannot run our kernels.*unpacked to dense weights"):
            model, _ = sparamx.load(tiny_artifact)
        assert model.sparamx_runtime == "torch (weights unpacked)"
    packed = sum(isinstance(m, SparseLinear) for m in model.modules())
    assert packed == (14 if on_kernels else 0)
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear if on_kernels else torch.nn.Linear)


def test_truncated_safetensors_names_the_file(copy_of):
    path = copy_of()
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="model.safetensors: sha256 does not match"):
        sparamx.load(path)
    with pytest.raises(ArtifactError, match="model.safetensors: corrupt safetensors file"):
        sparamx.load(path, verify=False)


def test_missing_tensor_is_named(copy_of):
    path = copy_of()
    rewrite_tensors(path, lambda t: t.pop(f"{PREFIX}.bitmask"))
    with pytest.raises(ArtifactError, match=f"tensor {PREFIX}.bitmask is missing"):
        sparamx.load(path)


def test_missing_dense_tensor_is_named(tmp_path, tiny_artifact):
    import shutil

    path = tmp_path / "a"
    shutil.copytree(tiny_artifact, path)
    rewrite_tensors(path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ArtifactError, match="tensor model.norm.weight is missing"):
        sparamx.load(path)


def test_misshaped_tensors_are_named(copy_of):
    path = copy_of()
    rewrite_tensors(path, lambda t: t.update({f"{PREFIX}.bitmask": t[f"{PREFIX}.bitmask"][:, :7].contiguous()}))
    with pytest.raises(ArtifactError, match=f"tensor {PREFIX}.bitmask must be torch.uint8 \\[136, 8\\]"):
        sparamx.load(path)


def test_misshaped_dense_tensor_is_named(tmp_path, tiny_artifact):
    import shutil

    path = tmp_path / "a"
    shutil.copytree(tiny_artifact, path)
    rewrite_tensors(path, lambda t: t.update({"model.norm.weight": torch.ones(63, dtype=torch.bfloat16)}))
    with pytest.raises(ArtifactError, match="tensor model.norm.weight has shape \\[63\\], the model needs \\[64\\]"):
        sparamx.load(path)


@pytest.mark.parametrize("kernels", [True, False])
def test_artifact_and_config_disagreeing_on_a_shape_is_named(tmp_path, tiny_artifact, kernels):
    import shutil

    path = tmp_path / "a"
    shutil.copytree(tiny_artifact, path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="layers.0.mlp.down_proj.* the model needs \\[64, 128\\]"):
        sparamx.load(path, kernels=kernels)


def test_popcount_disagreeing_with_offsets_is_named(copy_of):
    path = copy_of()

    def flip(tensors):
        tensors[f"{PREFIX}.bitmask"][3, 0] ^= 1  # one more or one fewer value in row 3

    rewrite_tensors(path, flip)
    with pytest.raises(ArtifactError, match=f"packed tensor {PREFIX} is inconsistent: .*row_offsets\\[4\\]"):
        sparamx.load(path)


@pytest.mark.parametrize("version, message", [("2.0", "format version '2.0' is not supported"), (None, "version")])
def test_unknown_major_version(copy_of, version, message):
    path = copy_of()
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = version
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        sparamx.load(path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="neither a sparamx artifact"):
        sparamx.load(tmp_path)
    with pytest.raises(ArtifactError, match="artifact directory not found"):
        sparamx.load(tmp_path / "absent")


def test_failure_while_writing_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args[1])
        raise OSError("disk full")

    monkeypatch.setattr(artifact_writer, "save_file", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        sparamx.compress(str(tiny_model_dir), MAGNITUDE, out=out, progress=False)
    assert calls and not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, tiny_model_dir, tiny_artifact):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_artifact, out)
    with pytest.raises(ArtifactError, match="already exists .*--overwrite"):
        sparamx.compress(str(tiny_model_dir), MAGNITUDE, out=out, progress=False)
    sparamx.compress(str(tiny_model_dir), MAGNITUDE, out=out, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    sparamx.load(out)


def test_wanda_on_a_model_directory_with_real_calibration_text(tmp_path, tiny_model_dir, data_root):
    recipe = Recipe.from_dict(
        {
            "name": "wanda-2of4",
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"nsamples": 2, "seqlen": 64},
        }
    )
    report = sparamx.compress(str(tiny_model_dir), recipe, out=tmp_path / "w", progress=False)
    assert abs(report["sparsity"] - 0.5) < 1e-9
    manifest = json.loads((tmp_path / "w" / MANIFEST).read_text())
    assert manifest["calibration"] == {"dataset": "c4", "nsamples": 2, "seqlen": 64}
    model, _ = sparamx.load(tmp_path / "w", kernels=False)
    weight = model.model.layers[1].self_attn.o_proj.weight
    assert ((weight.view(weight.shape[0], -1, 4) != 0).sum(dim=2) <= 2).all()


def test_unpruned_layers_are_stored_dense(tmp_path, tiny_model_dir):
    recipe = Recipe(name="mixed", prune=PruneConfig(method="magnitude", layers={"model.layers.1.*": 0.0}))
    sparamx.compress(str(tiny_model_dir), recipe, out=tmp_path / "m", progress=False)
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in tensors and "model.layers.1.mlp.up_proj.bitmask" not in tensors
    assert f"{PREFIX}.bitmask" in tensors
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "model.layers.1.mlp.up_proj" in config["quantization_config"]["sparsity_config"]["ignore"]
    model, _ = sparamx.load(tmp_path / "m", kernels=False)
    assert (model.model.layers[1].mlp.up_proj.weight != 0).all()
    model, _ = sparamx.load(tmp_path / "m", kernels=True)
    assert isinstance(model.model.layers[1].mlp.up_proj, DenseLinear)  # dense layers run on the dense kernel
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)


# ---- INT8 artifacts (bitmap and dense)


# Without SmoothQuant, so the stored weights are the pruned ones quantized (recipes/int8.yaml smooths first).
INT8_RECIPES = {
    "magnitude-50-int8": load_recipe("recipes/magnitude-50-int8.yaml"),
    "int8": Recipe(name="int8", prune=PruneConfig(method="magnitude", sparsity=0.0), quantize=QuantizeConfig("int8")),
    "magnitude-50-int8-bf16-head": Recipe(
        name="magnitude-50-int8-bf16-head",
        prune=PruneConfig(method="magnitude", sparsity=0.5),
        quantize=QuantizeConfig("int8", lm_head=False),
    ),
}


@pytest.fixture(scope="module")
def int8_artifacts(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for name, recipe in INT8_RECIPES.items():
        out[name] = root / name
        report = sparamx.compress(str(tiny_model_dir), recipe, out=out[name], progress=False)
        assert report["weights"] == "int8" and report["linears"] == 14
    return out


def reference_model(tiny_model_dir, recipe_name):
    """The source, pruned as the recipe says, every decoder linear replaced by its int8 dequantization (bf16)."""
    model = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32)
    records = prune_layerwise(model, INT8_RECIPES[recipe_name].prune, None, progress=False)
    with torch.no_grad():
        for record in records:
            linear = model.get_submodule(record.name)
            linear.weight.copy_(dequantize(*quantize_per_channel(linear.weight)))
    # Built as transformers builds a bf16 model (its rotary buffers stay fp32), then given those weights.
    reference = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.bfloat16).eval()
    reference.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    if INT8_RECIPES[recipe_name].quantize.lm_head:  # its own linear: the tied embeddings keep their bf16 weight
        head = torch.nn.Linear(*reversed(reference.lm_head.weight.shape), bias=False, dtype=torch.bfloat16)
        head.weight.data.copy_(dequantize(*quantize_per_channel(model.lm_head.weight.detach())))
        reference.lm_head = head
    return reference


def test_int8_names_dtypes_and_config(int8_artifacts):
    tensors = load_file(int8_artifacts["magnitude-50-int8"] / "model.safetensors")
    assert tensors[f"{PREFIX}.compressed"].dtype == torch.int8
    assert tensors[f"{PREFIX}.weight_scale"].dtype == torch.float32 and tensors[f"{PREFIX}.weight_scale"].shape == (
        136,
        1,
    )
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((int8_artifacts["magnitude-50-int8"] / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized" and config["sparsity_config"]["format"] == "sparse-bitmask"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"
    manifest = json.loads((int8_artifacts["magnitude-50-int8"] / "sparamx.json").read_text())
    assert {(r["kind"], r["dtype"]) for r in manifest["layers"]} == {("bitmap", "int8")}
    dense = load_file(int8_artifacts["int8"] / "model.safetensors")
    assert dense[f"{PREFIX}.weight"].dtype == torch.int8 and f"{PREFIX}.bitmask" not in dense
    manifest = json.loads((int8_artifacts["int8"] / "sparamx.json").read_text())
    assert {(r["kind"], r["dtype"]) for r in manifest["layers"]} == {("dense", "int8")}


def test_int8_lm_head_is_stored_apart_from_the_tied_embeddings(int8_artifacts, smol_tokenizer):
    path = int8_artifacts["magnitude-50-int8"]  # the shipped recipe: lm_head int8
    tensors = load_file(path / "model.safetensors")
    vocab = len(smol_tokenizer)
    assert tensors["lm_head.weight"].dtype == torch.int8 and tensors["lm_head.weight"].shape == (vocab, 64)
    assert tensors["lm_head.weight_scale"].shape == (vocab, 1)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    quant = config["quantization_config"]
    assert "lm_head" in quant["config_groups"]["group_0"]["targets"] and quant["ignore"] == []
    assert "lm_head" in quant["sparsity_config"]["ignore"]  # quantized, never pruned
    manifest = json.loads((path / "sparamx.json").read_text())
    assert manifest["lm_head"] == {"name": "lm_head", "kind": "dense", "dtype": "int8"}
    assert all(r["name"] != "lm_head" for r in manifest["layers"])
    _, totals = artifact_table(path)
    assert totals["lm_head"]["bytes"] == vocab * 64 and totals["lm_head"]["bits_per_weight"] == 8.0
    assert artifact_table(int8_artifacts["int8"])[1]["lm_head"] is None


def test_a_config_tying_a_stored_head_is_named(int8_artifacts, tmp_path):
    path = tmp_path / "tied"
    shutil.copytree(int8_artifacts["magnitude-50-int8"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    for kernels in (True, False):  # re-tied, the int8 lm_head would be dropped for the embeddings without a word
        with pytest.raises(ArtifactError, match="config.json: ties lm_head to the embeddings, but the artifact"):
            sparamx.load(path, kernels=kernels)


@pytest.mark.parametrize("name", ["magnitude-50-int8", "int8", "magnitude-50-int8-bf16-head"])
def test_int8_reload_is_exact_and_kernels_stay_close(int8_artifacts, tiny_model_dir, name):
    reference = reference_model(tiny_model_dir, name)
    model, tokenizer = sparamx.load(int8_artifacts[name], kernels=False)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(model(ids).logits, expected)
        fast, _ = sparamx.load(int8_artifacts[name], kernels=True)
        kind = SparseLinear if name.startswith("magnitude-50") else DenseLinear
        assert sum(isinstance(m, kind) and m.int8 for m in fast.modules()) == 14
        head = INT8_RECIPES[name].quantize.lm_head
        assert isinstance(fast.lm_head, DenseLinear) and fast.lm_head.int8 == head
        assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) != head
        # Activations quantized per token to 8 bits: the logits keep a high signal-to-noise ratio.
        assert sqnr_db(expected.float(), fast(ids).logits.float()) > 25
    assert fast.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)


SCALE = f"{PREFIX}.weight_scale"


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("magnitude-50-int8", lambda t: t.pop(SCALE), f"{SCALE} is missing"),
        ("int8", lambda t: t.pop(SCALE), f"{SCALE} is missing"),
        ("magnitude-50-int8", lambda t: t.update({SCALE: -t[SCALE]}), "finite and positive"),
        ("int8", lambda t: t.update({SCALE: torch.ones(3, 1)}), "must be float \\[136, 1\\]"),
        (
            "magnitude-50-int8",
            lambda t: t.update({f"{PREFIX}.compressed": t[f"{PREFIX}.compressed"].to(torch.bfloat16)}),
            "weight_scale given, but .* values are not int8",
        ),
    ],
)
def test_int8_values_need_a_good_scale(int8_artifacts, tmp_path, name, edit, message):
    path = tmp_path / name
    shutil.copytree(int8_artifacts[name], path)
    rewrite_tensors(path, edit)
    for kernels in (True, False):
        with pytest.raises(ArtifactError, match=message):
            sparamx.load(path, kernels=kernels)


def test_an_artifact_is_a_source_for_later_stages(tiny_artifact, tmp_path):
    """Quantizing the magnitude-50 artifact: same bitmasks, values = int8 of the stored bf16 weights."""
    out = tmp_path / "requantized"
    sparamx.compress(str(tiny_artifact), INT8_RECIPES["int8"], out=out, progress=False)
    source, derived = load_file(tiny_artifact / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(derived[f"{PREFIX}.bitmask"], source[f"{PREFIX}.bitmask"])  # 50% sparse: still a bitmap
    manifest = json.loads((out / "sparamx.json").read_text())
    assert manifest["source_model"]["kind"] == "artifact"
    original, _ = sparamx.load(tiny_artifact, dtype=torch.float32, kernels=False)
    model, _ = sparamx.load(out, dtype=torch.float32, kernels=False)
    for record in manifest["layers"]:
        weight = original.get_submodule(record["name"]).weight.detach()
        expected = dequantize(*quantize_per_channel(weight))
        assert torch.equal(model.get_submodule(record["name"]).weight, expected), record["name"]


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_a_barely_sparse_layer_is_stored_and_runs_dense(tmp_path, tiny_model_dir, weights):
    """Bitmap or dense is decided once, when the artifact is written, and the manifest's kind is what runs."""
    layers = {"model.layers.1.*": 0.1}  # below BITMAP_FROM for both dtypes; layer 0 at 50%
    recipe = Recipe(
        name="barely", prune=PruneConfig(method="magnitude", layers=layers), quantize=QuantizeConfig(weights)
    )
    sparamx.compress(str(tiny_model_dir), recipe, out=tmp_path / "b", progress=False)
    kinds = {r["name"]: r["kind"] for r in json.loads((tmp_path / "b" / MANIFEST).read_text())["layers"]}
    model, _ = sparamx.load(tmp_path / "b", kernels=True)
    for name, kind in kinds.items():
        assert kind == ("dense" if name.startswith("model.layers.1.") else "bitmap"), name
        assert isinstance(model.get_submodule(name), DenseLinear if kind == "dense" else SparseLinear), name
    reference, _ = sparamx.load(tmp_path / "b", dtype=torch.float32, kernels=False)
    weight = reference.model.layers[1].mlp.up_proj.weight
    assert abs((weight == 0).float().mean().item() - 0.1) < 0.01  # stored dense, still pruned
