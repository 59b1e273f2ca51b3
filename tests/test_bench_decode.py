import json

import pytest

from sparamx.eval.bench_decode import main


def test_bench_decode_writes_json_table_and_plot(tmp_path, tiny_model_dir):
    """Each configuration in a fresh process (four here: batch 2 at the prompt length, and batch 1), artifacts built
    into the cache first."""
    runtimes = ["stock bf16", "sparamx 50% int8"]
    args = ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--models", str(tiny_model_dir)]
    args += ["--runtimes", *runtimes, "--batches", "2", "--prompts", "8", "--new-tokens", "3", "--threads", "1"]
    assert main(args) == 0
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r.get("error") for r in data["rows"]] == [None] * 4
    assert {(r["runtime"], r["batch"]) for r in data["rows"]} == {(rt, b) for rt in runtimes for b in (1, 2)}
    for row in data["rows"]:
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0 and row["peak_rss_mb"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 1e3 / row["decode_ms_per_token"])
        assert (row["artifact"] is None) == row["runtime"].startswith("stock")
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| sparamx 50% int8 | 2 | 8 |" in table and "× stock bf16" in table
    assert (tmp_path / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"
