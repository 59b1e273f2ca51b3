"""`make prune MODEL=llama-3-8b` without the hub: a local directory with Llama-3-8B's real shapes (2 decoder layers)
and random bf16 safetensors, pruned with Wanda. Layer-by-layer processing and memory-mapped loading must keep the
pruning process's peak RSS under 1.5x one copy of the weights (slow: ~2 min on 2 cores)."""

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.slow

BUILD = """
import sys
from pathlib import Path
from sparamx.eval.bench_decode import random_llama3_shaped
random_llama3_shaped(Path(sys.argv[1]), layers=2)
"""

PRUNE = """
import json, sys
import sparamx
from sparamx.eval.bench_decode import peak_rss_mb
from sparamx.pipeline.recipe import Recipe
recipe = Recipe.from_dict({
    "name": "wanda-50-small",
    "prune": {"method": "wanda", "sparsity": 0.5},
    "calibration": {"dataset": "c4", "nsamples": 4, "seqlen": 256},
})
report = sparamx.compress(sys.argv[1], recipe, out=sys.argv[2], progress=False)
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "report": report}))
"""


def test_wanda_on_llama3_8b_shapes_stays_within_one_and_a_half_copies(tmp_path, data_root, report):
    source, out = tmp_path / "llama-3-8b-2l", tmp_path / "artifact"
    subprocess.run([sys.executable, "-c", BUILD, str(source)], check=True)  # its memory is not the pruner's
    weights_mb = (source / "model.safetensors").stat().st_size / 2**20
    config = json.loads((source / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (4096, 14336, 128256)

    run = subprocess.run(
        [sys.executable, "-c", PRUNE, str(source), str(out)], check=True, capture_output=True, text=True
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    peak = result["peak_rss_mb"]
    report(
        f"Wanda on Llama-3-8B shapes (2 layers): peak RSS {peak:.0f} MiB for {weights_mb:.0f} MiB of bf16 weights "
        f"({peak / weights_mb:.2f}x); prune {result['report']['timings']['prune_s']:.0f}s"
    )
    assert result["report"]["packed"] == 2 * 7
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        assert fh.get_slice("model.layers.1.mlp.down_proj.bitmask").get_shape() == [4096, 14336 // 8]
    assert peak < 1.5 * weights_mb
