import pytest
import torch
from transformers import AutoModelForCausalLM

from sparamx.pipeline.layerwise import (
    InputStats,
    block_output,
    capture_block_inputs,
    input_groups,
    prune_layerwise,
)
from sparamx.pipeline.models import linear_modules
from sparamx.pipeline.pruning import prune_mask, wanda_scores
from sparamx.pipeline.quantize import dequantize, quantize_per_channel
from sparamx.pipeline.quantizing import quantize_weights
from sparamx.pipeline.recipe import PruneConfig, QuantizeConfig


@pytest.fixture
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def windows():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 49152, (1, 48), generator=gen) for _ in range(3)]


def test_linears_are_grouped_by_shared_input_in_execution_order(tiny, windows):
    hidden, kwargs = capture_block_inputs(tiny, windows[:1])
    block = tiny.model.layers[0]
    groups = input_groups(block, linear_modules(block, "L"), hidden[0], kwargs)
    assert groups == [
        ["L.self_attn.q_proj", "L.self_attn.k_proj", "L.self_attn.v_proj"],
        ["L.self_attn.o_proj"],
        ["L.mlp.gate_proj", "L.mlp.up_proj"],
        ["L.mlp.down_proj"],
    ]


def test_wanda_uses_the_input_norms_of_each_linear(tiny, windows):
    block = tiny.model.layers[0]
    weight = block.self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        x = torch.cat([block.input_layernorm(tiny.model.embed_tokens(ids)) for ids in windows], dim=1)[0]
    expected = prune_mask(wanda_scores(weight, x.double().square().sum(dim=0)), 0.5, None)
    records = prune_layerwise(tiny, PruneConfig(method="wanda", sparsity=0.5), windows, progress=False)
    assert torch.equal(block.self_attn.q_proj.weight != 0, expected)
    assert [r.name for r in records[:7]] == list(linear_modules(block, "model.layers.0"))
    assert all(r.nnz == r.shape[0] * r.shape[1] // 2 for r in records)


def test_sequential_pruning_feeds_later_groups_pruned_inputs(tiny_model_dir, windows):
    masks = {}
    for sequential in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        prune_layerwise(model, PruneConfig(method="wanda", sequential=sequential), windows, progress=False)
        masks[sequential] = {n: m.weight != 0 for n, m in linear_modules(model.model.layers[0], "l0").items()}
    assert torch.equal(masks[True]["l0.self_attn.q_proj"], masks[False]["l0.self_attn.q_proj"])
    assert not torch.equal(masks[True]["l0.mlp.down_proj"], masks[False]["l0.mlp.down_proj"])


@pytest.mark.parametrize("features", [64, 129, 300])
def test_input_stats_gram_is_x_transpose_x_and_exactly_symmetric(features):
    """Only the tiles on and above the diagonal are accumulated; the gram read between updates (mirrored) and at the
    end both equal X^T X of the tokens so far, and the diagonal gives the sums of squares."""
    gen = torch.Generator().manual_seed(features)
    stats, seen = InputStats(features, gram=True), []
    for tokens in (7, 50, 1):
        seen.append(torch.randn(tokens, features, generator=gen, dtype=torch.float64) * 3)
        stats(None, (seen[-1].float().reshape(1, tokens, features),), None)
        x = torch.cat(seen)
        expected = (x.T @ x).float()
        assert torch.equal(stats.gram, stats.gram.T)
        torch.testing.assert_close(stats.gram, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(stats.sums, expected.diagonal().double(), rtol=1e-5, atol=1e-4)


def test_per_layer_ratios_and_magnitude(tiny):
    config = PruneConfig(method="magnitude", sparsity=0.5, layers={"*.mlp.*": 0.75, "model.layers.1.*": 0.0})
    records = {r.name: r for r in prune_layerwise(tiny, config, None, progress=False)}
    assert records["model.layers.0.mlp.up_proj"].sparsity == 0.75
    assert records["model.layers.0.self_attn.q_proj"].sparsity == 0.5
    assert records["model.layers.1.self_attn.q_proj"].sparsity == 0.0


def test_wanda_without_windows_is_an_error(tiny):
    with pytest.raises(ValueError, match="calibration windows"):
        prune_layerwise(tiny, PruneConfig(method="wanda"), None, progress=False)


def test_refit_keeps_the_wanda_mask_and_lowers_each_blocks_error(tiny_model_dir, windows):
    """prune.refit changes kept weights only: same masks as plain Wanda (the scores see the same inputs for the first
    group), exactly the target sparsity, and the first block's q_proj output closer to the dense one."""
    models = {}
    for refit in (False, True):
        models[refit] = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        prune_layerwise(models[refit], PruneConfig(method="wanda", refit=refit), windows, progress=False)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    q = {k: m.model.layers[0].self_attn.q_proj.weight.detach() for k, m in models.items()}
    assert torch.equal(q[True] != 0, q[False] != 0)
    assert not torch.equal(q[True], q[False])
    with torch.no_grad():
        x = torch.cat([dense.model.layers[0].input_layernorm(dense.model.embed_tokens(ids)) for ids in windows], 1)[0]
    reference = x @ dense.model.layers[0].self_attn.q_proj.weight.detach().T
    errors = {k: float((x @ w.T - reference).norm()) for k, w in q.items()}
    assert errors[True] < errors[False]
    for name, module in linear_modules(models[True].model.layers[1], "l1").items():
        assert int((module.weight == 0).sum()) >= module.weight.numel() // 2, name


def test_adaptive_mask_chooses_by_blocks_of_128_columns(tiny_model_dir, windows):
    """prune.adaptive_mask: a linear of <= 128 inputs is one block, chosen before any update (Wanda's mask, refit:
    the same weights as without it); above that, each row drops exactly half of each block of 128 columns."""
    models = {}
    for adaptive in (False, True):
        models[adaptive] = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        config = PruneConfig(method="wanda", refit=True, adaptive_mask=adaptive)
        prune_layerwise(models[adaptive], config, windows, progress=False)
    layer = {k: m.model.layers[0] for k, m in models.items()}
    assert layer[True].self_attn.q_proj.in_features <= 128
    torch.testing.assert_close(layer[True].self_attn.q_proj.weight, layer[False].self_attn.q_proj.weight)
    down = {k: v.mlp.down_proj.weight.detach() for k, v in layer.items()}
    assert down[True].shape[1] == 136
    assert ((down[True][:, :128] == 0).sum(dim=1) == 64).all() and ((down[True][:, 128:] == 0).sum(dim=1) == 4).all()
    assert not torch.equal(down[True] != 0, down[False] != 0)
    for name, module in linear_modules(models[True].model.layers[1], "l1").items():
        weight = module.weight
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all(), name


@pytest.mark.parametrize("head", [False, True])
def test_quantize_stage_leaves_the_model_and_gptq_beats_rounding_on_the_block_outputs(tiny, windows, head):
    """quantize_weights(rtn) is quantize_per_channel of each weight; gptq returns every linear asked for (lm_head
    included, its tied embeddings untouched), on the same scales, leaves the float model as it was, and moves the
    first block's output on the calibration windows less than rounding to nearest does."""
    names = [name for name, _ in tiny.named_modules() if name.startswith("model.layers.") and name.endswith("_proj")]
    names += ["lm_head"] if head else []
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    rtn = quantize_weights(tiny, names, QuantizeConfig(weights="int8"), windows, progress=False)
    gptq = quantize_weights(tiny, names, QuantizeConfig(weights="int8", method="gptq"), windows, progress=False)
    assert sorted(gptq) == sorted(rtn) == sorted(names)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight
    for name in names:
        expected = quantize_per_channel(tiny.get_submodule(name).weight)
        assert torch.equal(rtn[name][0], expected[0]) and torch.equal(rtn[name][1], expected[1])
        assert torch.equal(gptq[name][1], expected[1])
    hidden, kwargs = capture_block_inputs(tiny, windows)
    block = tiny.model.layers[0]
    with torch.no_grad():
        reference = [block_output(block(h, **kwargs)) for h in hidden]
    errors = {}
    for method, quantized in (("rtn", rtn), ("gptq", gptq)):
        with torch.no_grad():
            for name, linear in linear_modules(block, "model.layers.0").items():
                linear.weight.copy_(dequantize(*quantized[name]))
            out = [block_output(block(h, **kwargs)) for h in hidden]
        errors[method] = sum((o - r).square().sum() for o, r in zip(out, reference, strict=True))
        tiny.load_state_dict(before)
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize("stage", ["wanda", "gptq"])
def test_replays_change_nothing_but_run_attention_and_linears_once_per_input(
    tiny_model_dir, windows, monkeypatch, stage
):
    """The block walk hands back attention and linear results a later pass asks for again with equal inputs and
    weights: the stage's result is bit for bit the one computed without them (budget 0: nothing kept), and they do
    hand results back."""
    from sparamx.pipeline import replay

    def run(budget: int):
        stores = []
        init = replay.ReplayStore.__init__

        def counted_init(self, budget_bytes):
            init(self, budget_bytes)
            stores.append(self)

        monkeypatch.setattr(replay.ReplayStore, "__init__", counted_init)
        monkeypatch.setattr(replay, "ATTENTION_BUDGET", budget)
        monkeypatch.setattr(replay, "LINEAR_BUDGET", budget)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        implementation = model.config._attn_implementation
        if stage == "wanda":
            config = PruneConfig(method="wanda", sparsity=0.5, refit=True, adaptive_mask=True)
            prune_layerwise(model, config, windows, progress=False)
            result = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            names = [n for i, b in enumerate(model.model.layers) for n in linear_modules(b, f"model.layers.{i}")]
            result = quantize_weights(model, names, QuantizeConfig("int8", method="gptq"), windows, progress=False)
        assert model.config._attn_implementation == implementation  # restored after the walk
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert not any("forward" in vars(m) for m in linears)  # the class's own forward again
        return result, sum(s.hits for s in stores)

    replayed, hits = run(512 << 20)
    plain, no_hits = run(0)
    # per block and window, with q/k/v, o, gate/up changed in turn: the passes for gate/up's and down's statistics
    # hand back q/k/v and the attention computed in o's pass, down's also o (9); the pass for the outputs, more
    layers = len(AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers)
    assert hits >= layers * len(windows) * 9 and no_hits == 0
    assert replayed.keys() == plain.keys()
    for name, value in replayed.items():
        if stage == "gptq":
            assert torch.equal(value[0], plain[name][0]) and torch.equal(value[1], plain[name][1]), name
        else:
            assert torch.equal(value, plain[name]), name
