"""The KV-sparsity accuracy report runs end to end on the real model and real text (a short context, so it is quick),
and its numbers behave: the dense cache agrees with itself, pruning half of K and V costs something but not all."""

import json

from sparamx.eval.kv_accuracy import main


def test_kv_accuracy_report(tmp_path, report):
    args = ["--contexts", "384", "--sparsities", "0,0.5", "--decode", "24", "--recent", "32", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "kv-accuracy.json").read_text())["rows"]
    by = {(r["k_sparsity"], r["v_sparsity"]): r for r in rows}
    assert set(by) == {(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5)}
    assert by[0.0, 0.0]["kl"] == 0 and by[0.0, 0.0]["top1_agreement"] == 1
    half = by[0.5, 0.5]
    assert 0 < half["kl"] < 1 and 0.5 < half["top1_agreement"] <= 1 and half["perplexity"] < 100
    assert (tmp_path / "kv-accuracy.md").read_text().count("\n| 384 |") == 4 and (
        tmp_path / "kv-accuracy.png"
    ).stat().st_size
    report(f"KV 50%/50% at context 384 (24 decoded tokens): KL {half['kl']:.4f}, top-1 {half['top1_agreement']:.0%}")
