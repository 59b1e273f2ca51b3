"""The fused decode step (kernels/decode_step.py, csrc/decode_layer.cpp) against the module-by-module path it
replaces, in real generation on a small random Llama (GQA groups of 3, head_dim 32, batch 2 with left padding) whose
linears are our packed modules: the same tokens and the same scores, bit for bit, for each weight format, fp32 and
bf16 models, the dense and a sparse KV cache, fused and unfusable q/k/v, on every kernel path this CPU has. Then the
op alone: opcheck, and its one-line errors."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparamx.kernels import cpu_paths, decode_step, kv_cache, ops
from sparamx.kernels.modules import DenseLinear, SparseLinear, fuse_rows
from sparamx.pipeline.errors import ModelError
from sparamx.pipeline.kv_sparsity import KVConfig
from sparamx.pipeline.models import decoder_layers, linear_modules

SPARSE_KV = KVConfig(k_sparsity=0.5, v_sparsity=0.5, recent=8, block=16)
CONFIG = {
    "vocab_size": 500,
    "hidden_size": 192,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def packed(weight: torch.Tensor, kind: str, gen: torch.Generator):
    """weight with about half its entries zeroed, as our module of `kind` (format-dtype, -sym: x_symmetric)."""
    w = weight.float() * (torch.rand(weight.shape, generator=gen) > 0.5)
    layout, dtype, *symmetric = kind.split("-")
    scale = None
    if dtype == "int8":
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        w = torch.round(w / scale[:, None]).to(torch.int8)
    else:
        w = w.to(torch.bfloat16)
    if layout == "sparse":
        module = SparseLinear(*ops.bitmap_pack(w), w.shape[1], weight_scale=scale)
    else:
        module = DenseLinear(w, weight_scale=scale)
    module.x_symmetric = bool(symmetric)
    return module


def packed_llama(dtype: torch.dtype, kind: str, kv: KVConfig | None = None, k_proj_kind: str | None = None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval().to(dtype)
    gen = torch.Generator().manual_seed(2)
    for i, layer in enumerate(decoder_layers(model)):
        for name, linear in linear_modules(layer, f"model.layers.{i}").items():
            this = k_proj_kind if k_proj_kind and name.endswith("k_proj") else kind
            model.set_submodule(name, packed(linear.weight.detach(), this, gen))
    kv_cache.install(model, kv or KVConfig())
    decode_step.install(model)
    return model


@pytest.fixture(scope="module")
def prompts():
    """Two prompts of 37 and 29 tokens, the shorter left-padded."""
    ids = torch.randint(3, 500, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :8], mask[1, :8] = 0, 0
    return ids, mask


class CountingStack:
    """A DecoderStack whose step calls are counted."""

    def __init__(self, stack):
        self.stack, self.calls = stack, 0

    def step(self, *args):
        self.calls += 1
        return self.stack.step(*args)


def fused_and_unfused(model, prompts):
    """generate() with the fused step, counting its calls, then with model.sparamx_decode_step = None."""
    step = model.sparamx_decode_step
    step.stack = CountingStack(step.stack)
    ids, mask = prompts
    runs = []
    for installed in (step, None):
        model.sparamx_decode_step = installed
        with torch.no_grad():
            runs.append(
                model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=24,
                    do_sample=False,
                    pad_token_id=0,
                    output_scores=True,
                    return_dict_in_generate=True,
                )  # fmt: skip
            )
    assert step.stack.calls == 23  # every token after the first
    return runs


def assert_same(fused, unfused):
    assert torch.equal(fused.sequences, unfused.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.scores, unfused.scores, strict=True))


@pytest.mark.parametrize(
    "dtype, kind",
    [
        (torch.bfloat16, "sparse-int8"),
        (torch.bfloat16, "dense-bf16"),
        (torch.float32, "sparse-bf16"),
        (torch.float32, "dense-int8"),
        (torch.bfloat16, "sparse-int8-sym"),
    ],
)
def test_fused_step_gives_the_tokens_and_scores_of_the_module_path(dtype, kind, prompts, monkeypatch):
    model = packed_llama(dtype, kind)
    assert [len(shapes) for _, shapes in model.sparamx_decode_step.layers] == [2 + 3 * 4] * 3  # q/k/v, gate/up fused
    assert model.sparamx_decode_step.layers[0][1][4] == int(kind.endswith("-sym"))  # x_symmetric reaches the op
    assert_same(*fused_and_unfused(model, prompts))


@pytest.mark.parametrize("isa", [p for p in cpu_paths.available_isas()])
def test_every_kernel_path_and_a_sparse_kv_cache(isa, prompts, monkeypatch):
    monkeypatch.setenv("SPARAMX_ISA", isa)
    model = packed_llama(torch.bfloat16, "sparse-int8", SPARSE_KV)
    fused, unfused = fused_and_unfused(model, prompts)
    assert_same(fused, unfused)


def test_qkv_that_cannot_be_fused_run_as_three_linears(prompts, monkeypatch):
    model = packed_llama(torch.bfloat16, "sparse-bf16", k_proj_kind="dense-bf16")
    assert model.sparamx_decode_step.layers[0][1][:2] == [3, 1]
    assert_same(*fused_and_unfused(model, prompts))


@pytest.mark.parametrize("kind", ["sparse-bf16", "sparse-int8", "dense-bf16", "dense-int8"])
def test_fuse_rows_computes_each_linears_rows_and_holds_no_weight_twice(kind):
    gen = torch.Generator().manual_seed(3)
    linears = [packed(torch.randn(n, 80, generator=gen), kind, gen) for n in (48, 16, 18)]
    x = torch.randn(3, 80, generator=gen).to(torch.bfloat16)
    before = [lin(x) for lin in linears]
    fused = fuse_rows(linears)
    assert torch.equal(fused(x), torch.cat(before, dim=1))
    assert f"out_features={48 + 16 + 18}" in repr(fused)
    assert all(torch.equal(lin(x), y) for lin, y in zip(linears, before, strict=True))
    storage = fused.values.untyped_storage().data_ptr()
    assert all(lin.values.untyped_storage().data_ptr() == storage for lin in linears)
    assert fuse_rows([linears[2], linears[0]]) is None  # 18 rows are not whole blocks of 4 before the last


def layer_args(b=2, hidden=64, hq=4, hkv=2, d=16, inter=96, cap=6, tail=3):
    gen = torch.Generator().manual_seed(4)
    shapes = (((hq + 2 * hkv) * d, hidden), (hidden, hq * d), (2 * inter, hidden), (hidden, inter))
    linears = [packed(torch.randn(n, k, generator=gen), "sparse-int8", gen) for n, k in shapes]
    weights = [torch.rand(hidden, generator=gen) + 0.5, torch.rand(hidden, generator=gen) + 0.5]
    shapes = [1, 1]
    for lin in linears:
        weights += [lin.values, lin.masks, lin.block_offsets, lin.row_sums, lin.weight_scale, None]
        shapes += [lin.out_features, lin.in_features, 0]
    empty = (torch.zeros(b, hkv, 0, d // 2, dtype=torch.bfloat16), torch.zeros(b, hkv, 0, d // 8, dtype=torch.uint8))
    k_tail, v_tail = (torch.randn(b, hkv, cap, d, generator=gen) for _ in range(2))
    angle = torch.rand(b, d, generator=gen)
    return [torch.randn(b, hidden, generator=gen), angle.cos(), angle.sin(), weights, shapes, [hq, hkv, d], 1e-5,
            *empty, k_tail, *empty, v_tail, 0, tail, None, d**-0.5]  # fmt: skip


def test_decode_layer_opcheck():
    torch.library.opcheck(torch.ops.sparamx.decode_layer.default, layer_args())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(4, a[4][:-2]), "linears need"),
        (lambda a: a.__setitem__(14, 6), "no room for token 6"),
        (lambda a: a.__setitem__(5, [2, 2, 16]), "q/k/v linear 0 must be"),
        (lambda a: a.__setitem__(1, a[1][:, :8]), "cos and sin must be"),
        (lambda a: a.__setitem__(3, [None, *a[3][1:]]), r"weights\[0\] \(input norm\) is missing"),
    ],
)
def test_decode_layer_errors_name_the_argument(change, message):
    args = layer_args()
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sparamx.decode_layer.default(*args)


def test_unpacked_linears_are_refused_with_the_module_named():
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": 1})).eval()
    kv_cache.install(model, KVConfig())
    with pytest.raises(ModelError, match="layer 0's self_attn.q_proj is not packed"):
        decode_step.install(model)
