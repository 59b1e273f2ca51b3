"""The attention benchmark writes its JSON, table and plot, with a row per runtime, context and batch (tiny sizes)."""

import json

from sparamx.eval.bench_attention import main


def test_bench_attention_writes_json_table_and_plot(tmp_path):
    args = ["--contexts", "64,300", "--batches", "1,2", "--sparsities", "0,0.5", "--working-set-gb", "0.01"]
    assert main([*args, "--repeats", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "attention.json").read_text())
    runtimes = {"sparamx dense cache", "sparamx 50% / 50%", "stock SDPA bf16", "stock SDPA fp32"}
    assert {(r["runtime"], r["context"], r["batch"]) for r in data["rows"]} == {
        (rt, c, b) for rt in runtimes for c in (64, 300) for b in (1, 2)
    }
    sparse = [r for r in data["rows"] if r["runtime"] == "sparamx 50% / 50%"]
    dense = [r for r in data["rows"] if r["runtime"] == "sparamx dense cache"]
    assert all(s["cache_mb"] < 0.6 * d["cache_mb"] for s, d in zip(sparse, dense, strict=True))
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in data["rows"]) and data["read_bandwidth_gbps"] > 0
    assert "threads" in data["title"] and "| 2 | 300 | stock SDPA bf16 |" in (tmp_path / "attention.md").read_text()
    assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG"
