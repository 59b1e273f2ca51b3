from pathlib import Path

import pytest

from sparamx.pipeline.errors import RecipeError
from sparamx.pipeline.recipe import DEFAULT_RECIPE, PruneConfig, Recipe, load_recipe, shipped_recipes

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_required_recipes_exist():
    required = {"magnitude-50", "wanda-50", "wanda-2of4", "wanda-50-int8", "magnitude-50-int8", "int8", "dense"}
    assert required <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_parse_and_round_trip(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert 0.0 <= recipe.prune.sparsity < 1.0


def test_two_of_four_implies_half_sparsity():
    prune = load_recipe(RECIPES[[p.stem for p in RECIPES].index("wanda-2of4")]).prune
    assert prune.nm == (2, 4) and prune.sparsity == 0.5


@pytest.mark.parametrize(
    "text, message",
    [
        ("prune:\n  sparsty: 0.5\n", "unknown key 'prune.sparsty'"),
        ("prunning: {}\n", "unknown key 'prunning'"),
        ("calibration:\n  nsamples: 4\n  sequence: 8\n", "unknown key 'calibration.sequence'"),
        ("prune:\n  sparsity: 1.0\n", "prune.sparsity must be a number in \\[0, 1\\)"),
        ("prune:\n  sparsity: -0.1\n", "prune.sparsity must be a number in \\[0, 1\\)"),
        ("prune:\n  sparsity: half\n", "prune.sparsity must be a number"),
        ("prune:\n  pattern: '4:4'\n", "N:M needs 0 < N < M"),
        ("prune:\n  pattern: '5:4'\n", "N:M needs 0 < N < M"),
        ("prune:\n  pattern: 2-4\n", "prune.pattern must be 'unstructured' or 'N:M'"),
        ("prune:\n  pattern: '2:4'\n  sparsity: 0.7\n", "contradicts prune.pattern"),
        ("prune:\n  pattern: '2:4'\n  layers: {'*': 0.5}\n", "per-layer ratios apply to unstructured"),
        ("prune:\n  layers: {'model.layers.0.*': 1.5}\n", "prune.layers\\['model.layers.0.\\*'\\]"),
        ("prune:\n  method: sparsegpt\n", "prune.method must be one of magnitude, wanda"),
        ("prune:\n  group: column\n", "prune.group must be one of row, layer"),
        ("calibration:\n  nsamples: 0\n", "calibration.nsamples must be a positive integer"),
        ("calibration:\n  seqlen: 12.5\n", "calibration.seqlen must be a positive integer"),
        ("prune: 0.5\n", "prune must be a mapping"),
        ("- a\n- b\n", "a recipe must be a mapping"),
        ("prune: [unclosed\n", "not valid YAML"),
        ("quantize:\n  weights: int4\n", "quantize.weights must be one of bf16, int8"),
        ("quantize:\n  weights: int8\n  smoothquant: 1.0\n", "quantize.smoothquant must be a number in \\(0, 1\\)"),
        ("quantize:\n  smoothquant: 0.5\n", "smoothquant only applies with quantize.weights: int8"),
        ("quantize:\n  weights: int8\n  smooth: 0.5\n", "unknown key 'quantize.smooth'"),
        ("quantize:\n  weights: int8\n  lm_head: int8\n", "quantize.lm_head must be true or false"),
        ("quantize:\n  lm_head: true\n", "quantize.lm_head only applies with quantize.weights: int8"),
        ("quantize:\n  weights: int8\n  method: awq\n", "quantize.method must be one of rtn, gptq"),
        ("quantize:\n  method: gptq\n", "quantize.method: gptq only applies with quantize.weights: int8"),
        ("quantize:\n  weights: int8\n  method: gptq\n  damp: 0\n", "quantize.damp must be a number in \\(0, 1\\]"),
        ("prune:\n  method: magnitude\n  refit: true\n", "prune.refit needs calibration inputs"),
        ("prune:\n  refit: yes please\n", "prune.refit must be true or false"),
        ("prune:\n  refit: true\n  refit_damp: 0\n", "prune.refit_damp must be a number in \\(0, 1\\]"),
        ("prune:\n  adaptive_mask: true\n", "prune.adaptive_mask .* needs prune.refit: true"),
        ("prune:\n  refit: true\n  adaptive_mask: 1\n", "prune.adaptive_mask must be true or false"),
        ("prune:\n  refit: true\n  adaptive_mask: true\n  group: layer\n", "needs prune.group: row"),
    ],
)
def test_bad_recipes_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml: no such recipe file, and no shipped recipe of that name"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="wanda-51: no such recipe file.*wanda-50"):
        load_recipe("wanda-51")


def test_shipped_recipes_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    """The installed package carries its recipes: a name, or the checkout-relative path, works outside the checkout;
    a file of the same name in the working directory wins."""
    assert set(shipped_recipes()) == {p.stem for p in RECIPES}
    monkeypatch.chdir(tmp_path)
    for name in ("wanda-50", "wanda-50.yaml", "recipes/wanda-50.yaml", DEFAULT_RECIPE):
        assert load_recipe(name) == load_recipe(RECIPES[[p.stem for p in RECIPES].index("wanda-50")])
    write(tmp_path, "prune: {method: magnitude, sparsity: 0.3}", name="wanda-50.yaml")
    assert load_recipe("wanda-50.yaml").prune.sparsity == 0.3


def test_per_layer_ratios_first_match_wins():
    prune = PruneConfig(sparsity=0.5, layers={"model.layers.0.*": 0.3, "*.mlp.*": 0.7})
    assert prune.sparsity_for("model.layers.0.mlp.up_proj") == 0.3
    assert prune.sparsity_for("model.layers.5.mlp.up_proj") == 0.7
    assert prune.sparsity_for("model.layers.5.self_attn.q_proj") == 0.5


def test_smoothquant_needs_calibration():
    recipe = Recipe.from_dict({"name": "x", "prune": {"method": "magnitude"}, "quantize": {"weights": "int8"}})
    assert not recipe.needs_calibration
    recipe.quantize.smoothquant = 0.5
    assert recipe.needs_calibration
    gptq = Recipe.from_dict(
        {"name": "x", "prune": {"method": "magnitude"}, "quantize": {"weights": "int8", "method": "gptq"}}
    )
    assert gptq.needs_calibration
