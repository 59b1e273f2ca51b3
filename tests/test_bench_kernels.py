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
