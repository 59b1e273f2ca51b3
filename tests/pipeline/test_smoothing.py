import pytest
import torch

from sparamx.pipeline.models import load_model, resolve_model
from sparamx.pipeline.quantize import dequantize, quantize_per_channel, smoothing_scales, sqnr_db
from sparamx.pipeline.smoothing import smooth_layerwise


def test_smoothing_scales_formula():
    act = torch.tensor([4.0, 0.0, 9.0])
    w1, w2 = torch.tensor([[1.0, 2.0, -4.0]]), torch.tensor([[-9.0, 1.0, 1.0]])
    s = smoothing_scales(act, [w1, w2], 0.5)
    assert torch.allclose(s, torch.tensor([2.0 / 3.0, 1.0, 3.0 / 2.0]))  # sqrt(4)/sqrt(9), idle -> 1, sqrt(9)/sqrt(4)
    with pytest.raises(ValueError, match="alpha must be in"):
        smoothing_scales(act, [w1], 1.0)


def int8_sqnr(linear, x):
    q, scale = quantize_per_channel(linear.weight)
    xq = x.float()
    lo, hi = xq.amin(-1, keepdim=True).clamp(max=0), xq.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 255
    zero = torch.round(-lo / step)
    xd = (torch.round(xq / step) + zero).clamp(0, 255).sub(zero).mul(step)  # per-token uint8, as the kernel does
    return sqnr_db(linear(x), torch.nn.functional.linear(xd, dequantize(q, scale)))


@torch.no_grad()
def test_smoothing_keeps_the_function_and_tames_an_outlier_channel(tiny_model_dir):
    model = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32).eval()
    model.model.layers[0].input_layernorm.weight[5] = 60.0  # an outlier channel feeding q/k/v, as real LLMs have
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, model.config.vocab_size, (1, 24), generator=gen) for _ in range(3)]
    probe = torch.randint(0, model.config.vocab_size, (1, 24), generator=gen)
    inputs = {}
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0][0]))
    before = model(probe).logits
    q_before = int8_sqnr(model.model.layers[0].self_attn.q_proj, inputs["x"])
    records = smooth_layerwise(model, windows, alpha=0.5, progress=False)
    after = model(probe).logits
    q_after = int8_sqnr(model.model.layers[0].self_attn.q_proj, inputs["x"])
    hook.remove()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert len(records) == 3 * model.config.num_hidden_layers
    assert float(model.model.layers[0].input_layernorm.weight[5]) < 60.0
    assert q_after > q_before + 3  # dB


@torch.no_grad()
def test_smoothing_the_head_unties_it_and_keeps_the_function(tiny_model_dir):
    model = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32).eval()
    model.model.norm.weight[3] = 40.0  # an outlier channel feeding lm_head
    embeddings = model.model.embed_tokens.weight.clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied in the source
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, model.config.vocab_size, (1, 24), generator=gen) for _ in range(3)]
    probe = torch.randint(0, model.config.vocab_size, (1, 24), generator=gen)
    inputs = {}
    hook = model.lm_head.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0][0]))
    before = model(probe).logits
    head_before = int8_sqnr(model.lm_head, inputs["x"])
    records = smooth_layerwise(model, windows, alpha=0.5, progress=False, head="lm_head")
    after = model(probe).logits
    head_after = int8_sqnr(model.lm_head, inputs["x"])
    hook.remove()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert records[-1]["absorbed_by"] == "model.norm" and records[-1]["linears"] == ["lm_head"]
    assert len(records) == 3 * model.config.num_hidden_layers + 1
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # the input side keeps its weights
    assert head_after > head_before + 3  # dB
