import json

import pytest

from sparamx.eval.bench_decode import main


def test_bench_decode_writes_json_table_and_plot(tmp_path, tiny_model_dir):
    """Each configuration in a fresh process (six here: batch 2 at the prompt length, and batch 1), artifacts built
    into the cache first; two runtimes share one artifact and differ in the KV cache they load with."""
    runtimes = ["stock bf16", "sparamx 50% int8", "sparamx 50% int8, KV 50%/50%"]
    args = ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--models", str(tiny_model_dir)]
    args += ["--runtimes", *runtimes, "--batches", "2", "--prompts", "8", "--new-tokens", "3", "--threads", "1"]
    args += ["--bandwidth-gib", "0.25"]
    assert main(args) == 0
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r.get("error") for r in data["rows"]] == [None] * 6
    assert {(r["runtime"], r["batch"]) for r in data["rows"]} == {(rt, b) for rt in runtimes for b in (1, 2)}
    for row in data["rows"]:
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0 and row["peak_rss_mb"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 1e3 / row["decode_ms_per_token"])
        assert (row["artifact"] is None) == row["runtime"].startswith("stock")
        assert row["weight_mb"] > 0
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| sparamx 50% int8 | 2 | 8 |" in table and "× stock bf16" in table and "weight floor ms" in table
    assert data["meta"]["read_bandwidth_gbps"] > 0
    assert (tmp_path / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads(
        (tmp_path / "cache" / f"{tiny_model_dir.name}-magnitude-50-int8" / "sparamx.json").read_text()
    )
    assert manifest["lm_head"]["dtype"] == "int8"


def test_cached_artifacts_are_reused_only_for_the_same_recipe(tmp_path):
    from sparamx.eval.bench_decode import _cached_with
    from sparamx.pipeline.artifact_format import FORMAT, VERSION
    from sparamx.pipeline.recipe import Recipe

    spec = Recipe.from_dict({"name": "r", "prune": {"method": "magnitude", "sparsity": 0.5}})
    assert not _cached_with(tmp_path, spec)  # nothing there
    manifest = {"format": FORMAT, "format_version": VERSION, "files": {"model.safetensors": {}}}
    (tmp_path / "sparamx.json").write_text(json.dumps({**manifest, "recipe": spec.to_dict()}))
    assert _cached_with(tmp_path, spec)
    edited = Recipe.from_dict({"name": "r", "prune": {"method": "magnitude", "sparsity": 0.6}})
    assert not _cached_with(tmp_path, edited)
    (tmp_path / "sparamx.json").write_text("{not json")
    assert not _cached_with(tmp_path, spec)


def test_peer_ratio_lines_compare_our_int8_with_each_llama_cpp_run():
    from sparamx.eval.bench_decode import peer_ratios

    rows = [
        {"model": "m", "runtime": "sparamx 50% int8", "batch": 1, "prompt": 8, "tokens_per_s": 30.0},
        {"model": "m", "runtime": "llama.cpp Q8_0", "batch": 1, "prompt": 8, "tokens_per_s": 20.0},
        {"model": "m", "runtime": "llama.cpp Q4_1", "batch": 1, "prompt": 8, "error": "crashed"},
        {"model": "m", "runtime": "sparamx 50% int8", "batch": 4, "prompt": 8, "tokens_per_s": 90.0},
    ]
    assert peer_ratios(rows) == ["", "- m, prompt 8: sparamx 50% int8 decodes at 1.50x llama.cpp Q8_0"]
    assert peer_ratios(rows[:1]) == []
    head = {"model": "m", "runtime": "sparamx 50% int8, bf16 lm_head", "batch": 1, "prompt": 8, "tokens_per_s": 50.0}
    assert (
        peer_ratios([*rows, head])[2] == "- m, prompt 8: sparamx 50% int8, bf16 lm_head decodes at 2.50x llama.cpp Q8_0"
    )


def test_llama_cpp_peer_runs_batch_one_on_the_shipped_gguf(tmp_path):
    pytest.importorskip("llama_cpp", reason="the llama.cpp peer is an optional extra: make install-bench")
    runtimes = ["llama.cpp Q4_1", "llama.cpp Q8_0"]
    args = ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--models", "smollm2-135m"]
    args += ["--runtimes", *runtimes, "--batches", "1", "2", "--prompts", "8", "--new-tokens", "3", "--threads", "1"]
    assert main(args) == 0
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [(r["runtime"], r["batch"], r.get("error")) for r in data["rows"]] == [(rt, 1, None) for rt in runtimes]
    assert all(r["decode_ms_per_token"] > 0 and "prompt_ids" not in r for r in data["rows"])
    assert list((tmp_path / "cache").glob("*.Q8_0.gguf"))  # requantized once, kept for the next run
    assert "llama-cpp-python 0.3.36" in (tmp_path / "out" / "bench.md").read_text()
