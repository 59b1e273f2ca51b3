"""INT8 on the real SmolLM2-135M weights and real text: every decoder linear's int8 output against its bf16 output
(slow: loads the model). Per-token uint8 activations suffer from the outlier channels of LLM hidden states;
SmoothQuant (quantize.smoothquant in a recipe) moves them into the weights."""

import statistics

import pytest
import torch

from sparamx.kernels.modules import DenseLinear
from sparamx.pipeline.models import decoder_layers, linear_modules, load_model, load_tokenizer, resolve_model
from sparamx.pipeline.quantize import quantize_per_channel, sqnr_db
from sparamx.pipeline.smoothing import smooth_layerwise
from sparamx.pipeline.textdata import calibration_windows, load_documents

pytestmark = pytest.mark.slow


@torch.no_grad()
def linear_sqnrs(model, ids) -> dict[str, tuple[float, float, float]]:
    """Per decoder linear, in dB against the bf16 kernel on the same inputs: the int8 kernel on the real activations
    of `ids`, int8 weights alone (activations unquantized), and the int8 kernel on Gaussian activations."""
    inputs, handles = {}, []
    linears = {}
    for i, layer in enumerate(decoder_layers(model)):
        linears.update(linear_modules(layer, f"model.layers.{i}"))
    for name, linear in linears.items():
        handles.append(linear.register_forward_pre_hook(lambda m, a, name=name: inputs.update({name: a[0][0]})))
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, linear in linears.items():
        x, w = inputs[name], linear.weight.detach()
        bf16 = DenseLinear(w.bfloat16())
        q, scale = quantize_per_channel(w)
        int8 = DenseLinear(q, None, scale)
        gaussian = torch.randn(x.shape, generator=gen)
        weights_only = x.bfloat16().float() @ (q.float() * scale[:, None]).T
        out[name] = (
            sqnr_db(bf16(x), int8(x)),
            sqnr_db(bf16(x), weights_only),
            sqnr_db(bf16(gaussian), int8(gaussian)),
        )
    return out


def test_int8_sqnr_on_real_weights(data_root, report):
    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=torch.float32).eval()
    text = (data_root / "wikitext-2-raw" / "wikitext2_test_joined.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[:40000], return_tensors="pt").input_ids[:, :512]

    plain = linear_sqnrs(model, ids)
    calibration = calibration_windows(tokenizer, load_documents("c4"), 8, 512, seed=0)  # C4 to smooth, WikiText to test
    smooth_layerwise(model, calibration, alpha=0.5, progress=False)
    smoothed = linear_sqnrs(model, ids)

    def summary(results, index):
        values = {name: r[index] for name, r in results.items()}
        worst = min(values, key=values.get)
        return f"min {values[worst]:.1f} dB ({worst}), median {statistics.median(values.values()):.1f} dB"

    report("int8 SQNR vs bf16 per linear, Gaussian activations: " + summary(plain, 2))
    report("int8 SQNR vs bf16 per linear, int8 weights only: " + summary(plain, 1))
    report("int8 SQNR vs bf16 per linear, real activations (WikiText): " + summary(plain, 0))
    report("int8 SQNR ... real activations after SmoothQuant (alpha 0.5, 8 x 512 C4 tokens): " + summary(smoothed, 0))
    assert min(r[2] for r in plain.values()) >= 30.0  # the int8 kernel on the real weights
    assert min(r[1] for r in plain.values()) >= 30.0  # per-channel int8 weights
    # Real hidden states have outlier channels that per-token uint8 cannot resolve well (v_proj: ~23 dB here);
    # SmoothQuant must recover most of it (~29.5 dB at worst, in down_proj).
    assert min(r[0] for r in smoothed.values()) >= min(r[0] for r in plain.values()) + 5.0
