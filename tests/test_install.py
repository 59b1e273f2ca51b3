"""`pip install .` (not editable) into a fresh virtual environment: every command and the Python API work from a
directory outside the checkout, with the recipes and offline eval tasks the package ships."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding sparamx as a built wheel; its dependencies (torch, transformers, ...) are this environment's,
    seen through a .pth file, so nothing is downloaded and no second torch is installed."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(site) / "sparamx-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = root / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels)]
    subprocess.run([*build, str(REPO)], check=True, timeout=1200)
    wheel = next(wheels.glob("sparamx-*.whl"))
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    return root / "venv"


def run(venv: Path, cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_installed_package_works_from_any_directory(venv, tmp_path, tiny_model_dir, data_root):
    where = run(
        venv,
        tmp_path,
        "python",
        "-c",
        "import sparamx, sparamx.kernels.ops as o; print(sparamx.__file__, o._C.__file__)",
    )
    assert str(venv) in where and str(REPO) not in where  # the wheel's copy, not the checkout
    for command in ("prune", "recipes", "inspect", "generate", "eval", "info", "bench"):
        assert "usage:" in run(venv, tmp_path, "sparamx", command, "--help")
    assert "wanda-50" in run(venv, tmp_path, "sparamx", "recipes")
    out = run(venv, tmp_path, "sparamx", "prune", "--model", tiny_model_dir, "--recipe", "wanda-50", "--quiet")
    artifact = tmp_path / "artifacts" / f"{tiny_model_dir.name}-wanda-50"
    assert f"wrote {artifact.relative_to(tmp_path)}" in out and (artifact / "sparamx.json").is_file()
    assert "mlp.up_proj" in run(venv, tmp_path, "sparamx", "inspect", artifact)
    assert "tokens/s" in run(
        venv, tmp_path, "sparamx", "generate", artifact, "--prompt", "Hello", "--max-new-tokens", "3"
    )
    assert "kernel paths available" in run(venv, tmp_path, "sparamx", "info")
    # No artifact named: the one prune wrote last; an offline task the package ships, reading $SPARAMX_DATA.
    assert "piqa_local" in run(
        venv, tmp_path, "sparamx", "eval", "--tasks", "piqa_local", "--limit", "4", "--threshold", "0.01"
    )
    api = (
        "import sparamx; model, tok = sparamx.load('{a}'); "
        "print(sparamx.compress('{m}', 'magnitude-50', out='api', progress=False)['packed'])"
    )
    assert run(venv, tmp_path, "python", "-c", api.format(a=artifact, m=tiny_model_dir)).splitlines()[0] == "14"
