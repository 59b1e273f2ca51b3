import subprocess
import sys

import pytest

import sparamx
from sparamx.cli import main
from sparamx.pipeline.recipe import PruneConfig, Recipe


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparamx.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    recipe = Recipe(name="magnitude-2of4", prune=PruneConfig(method="magnitude", pattern="2:4"))
    sparamx.compress(str(tiny_model_dir), recipe, out=out, progress=False)
    return out


def test_help_explains_each_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("prune", "inspect", "generate", "info"):
        assert command in result.stdout
    prune = run_cli("prune", "--help")
    assert "--recipe" in prune.stdout and "llama-3-8b" in prune.stdout and "--calib" in prune.stdout


@pytest.mark.parametrize("command", ["prune", "recipes", "inspect", "generate", "info", "eval", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_recipes_lists_each_shipped_recipe_with_its_description(capsys):
    from sparamx.pipeline.recipe import load_recipe, shipped_recipes

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = shipped_recipes()
    assert len(lines) == len(shipped) and "wanda-50" in shipped
    for line, (name, path) in zip(lines, sorted(shipped.items()), strict=True):
        description = load_recipe(path).description
        assert description and line.split()[0] == name and description in line


def test_info_reports_the_detected_path(capsys):
    from sparamx.kernels import cpu_paths

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"chosen: {cpu_paths.describe_isa()}" in out and "cpu features:" in out
    expected = "our kernels" if cpu_paths.kernels_preferred() else "torch, unpacked"
    assert f"sparamx.load runs packed linears on {expected}" in out


def test_inspect_prints_layers_and_totals(artifact, capsys):
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "bitmap" in out and "50.00%" in out
    total = [line for line in out.splitlines() if line.startswith("total linears")][0]
    bits = float(total.split()[-1])
    assert 8.5 < bits < 10.5  # 50% of bf16 values (8 bits/weight) + the 1-bit mask + row offsets on tiny rows


def test_generate_prints_a_completion_and_speed(artifact):
    result = run_cli("generate", str(artifact), "--prompt", "Hello", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and "tokens/s" in result.stderr
    assert "sparamx kernels: " in result.stderr or "torch (weights unpacked)" in result.stderr
    if "sparamx kernels: " in result.stderr:  # on our kernels, generate runs the fused decode step unless told not to
        assert "fused decode step" in result.stderr
        unfused = run_cli("generate", str(artifact), "--prompt", "Hello", "--max-new-tokens", "4", "--no-fused-decode")
        assert unfused.stdout == result.stdout and "fused decode step" not in unfused.stderr
    chat = run_cli("generate", str(artifact), "--chat", "--prompt", "Hello", "--max-new-tokens", "4")
    assert chat.returncode == 0, chat.stderr
    assert "<|im_start|>" not in chat.stdout and "4 tokens" in chat.stderr


def test_fused_decode_asked_for_where_it_cannot_run_is_refused_before_any_work(artifact):
    from sparamx.pipeline.errors import RecipeError

    with pytest.raises(RecipeError, match="fused_decode=True: it runs on the sparamx KV cache, and kv_cache=False"):
        sparamx.load(artifact, kv_cache=False, fused_decode=True)
    with pytest.raises(RecipeError, match="fused_decode=True: it runs our kernels"):
        sparamx.load(artifact, kernels=False, fused_decode=True)


def test_generate_with_a_sparse_kv_cache(artifact):
    result = run_cli(
        "generate", str(artifact), "--prompt", "Hello", "--max-new-tokens", "4", "--kv-sparsity", "0.5,0.5"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and "KV cache 0.5 / 0.5 sparse" in result.stderr
    plain = run_cli("generate", str(artifact), "--prompt", "Hello", "--max-new-tokens", "4", "--no-kv-cache")
    assert plain.returncode == 0 and "transformers' KV cache" in plain.stderr
    both = run_cli("generate", str(artifact), "--prompt", "x", "--kv-sparsity", "0.5", "--no-kv-cache")
    assert both.returncode == 2 and "kv_cache=False" in both.stderr
    bad = run_cli("generate", str(artifact), "--prompt", "x", "--kv-sparsity", "0.5,1.5")
    assert bad.returncode == 2 and "kv.v_sparsity must be a number in [0, 1)" in bad.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "/nonexistent/artifact"], "artifact directory not found"),
        (["prune", "--recipe", "/nonexistent.yaml"], "/nonexistent.yaml: no such recipe file"),
        (["prune", "--model", "/nonexistent/model"], "no such model directory"),
        (["eval", "/nonexistent/artifact", "--kv-sparsity", "0.5,0.5"], "never read the KV cache"),
    ],
)
def test_user_errors_are_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparamx: error:") and message in lines[0]
