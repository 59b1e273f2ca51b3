import json

from sparamx.eval.bench_kernels import main


def test_bench_kernels_writes_json_table_and_plot(tmp_path):
    args = [
        "--out",
        str(tmp_path),
        "--shapes",
        "64x96",
        "--sparsities",
        "0.5",
        "--ms",
        "1",
        "3",
        "--working-set-gb",
        "0.001",
        "--repeats",
        "1",
    ]
    assert main(args) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    ops = {(r["m"], r["op"]) for r in data["rows"]}
    expected = ("torch bf16", "torch fp32", "bitmap bf16", "bitmap int8", "dense bf16", "dense int8")
    assert ops == {(m, op) for m in (1, 3) for op in expected}
    assert data["meta"]["read_bandwidth_gbps"] > 0 and all(r["ms"] > 0 for r in data["rows"])
    table = (tmp_path / "kernels.md").read_text()
    assert "| 64x96 | 64×96 | 0.5 | 1 | bitmap int8 |" in table and "Measured read bandwidth" in table
    assert (tmp_path / "kernels.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_kernels_forced_path_names_its_files_and_compares_with_best_stock(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARAMX_ISA", raising=False)  # restored after the test: main sets it for --isa
    args = ["--out", str(tmp_path), "--shapes", "40x70", "--sparsities", "0.5", "--ms", "1"]
    assert main([*args, "--working-set-gb", "0.001", "--repeats", "1", "--isa", "avx2"]) == 0
    data = json.loads((tmp_path / "kernels-avx2.json").read_text())
    assert data["meta"]["isa"] == "avx2 (forced by SPARAMX_ISA)"
    stock = {r["op"]: r["ms"] for r in data["rows"] if r["op"].startswith("torch")}
    for r in data["rows"]:
        assert abs(r["speedup_vs_best_stock"] - min(stock.values()) / r["ms"]) < 1e-9
    assert "× best stock" in (tmp_path / "kernels-avx2.md").read_text()
    assert (tmp_path / "kernels-avx2.png").exists() and not (tmp_path / "kernels.json").exists()
