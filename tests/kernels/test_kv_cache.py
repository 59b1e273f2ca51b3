"""The sparamx KV cache and attention in real generation (a small random Llama: GQA groups of 3, head_dim 32):
at sparsity 0 greedy output equals transformers' DynamicCache token for token (fp32, batch 2 with left padding);
sparse, the op on the packed cache equals SDPA on the same pruned K/V, on the kernel path and the reference one."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sparamx.kernels import kv_cache, ops
from sparamx.kernels.kv_cache import SparseKVCache, SparseKVLayer
from sparamx.pipeline.errors import ModelError
from sparamx.pipeline.kv_sparsity import KVConfig, unpack

SPARSE = KVConfig(k_sparsity=0.5, v_sparsity=0.5, recent=8, block=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=500,
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    kv_cache.install(model, KVConfig())
    return model


@pytest.fixture(scope="module")
def prompts():
    """Two prompts of 37 and 29 tokens, the shorter left-padded."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (2, 37), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :8], mask[1, :8] = 0, 0
    return ids, mask


def generate(model, prompts, **kwargs):
    ids, mask = prompts
    kwargs = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kwargs)


def test_dense_cache_equals_dynamic_cache(model, prompts):
    model.sparamx_kv = KVConfig()
    ours = generate(model, prompts)
    theirs = generate(model, prompts, cache=DynamicCache(config=model.config))
    assert torch.equal(ours.sequences, theirs.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.scores, theirs.scores, strict=True)) < 1e-4


def test_sparse_cache_prunes_and_the_op_equals_sdpa_on_its_tokens(model, prompts, monkeypatch):
    model.sparamx_kv = SPARSE
    cache = SparseKVCache(model.config, SPARSE)
    ours = generate(model, prompts, cache=cache)
    layer = cache.layers[0]
    assert layer.packed + layer.tail == 37 + 39 and layer.tail <= SPARSE.recent + SPARSE.block
    assert layer.packed > 0 and layer.packed % ops.kv_tile() == 0  # K in whole tiles
    for stream in (layer.k, layer.v):  # half of head_dim 32, every packed token
        values, masks = stream.values[:, :, : layer.packed], stream.masks[:, :, : layer.packed]
        assert (unpack(torch.ones_like(values), masks, stream.tile).sum(-1) == 16).all()

    def dense_attend(self, query, valid, scale):  # SDPA over the same pruned K/V, expanded per query head
        k, v = (t.float().repeat_interleave(query.shape[1] // t.shape[1], 1) for t in self.dense())
        mask = None if valid is None else valid[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float()[:, :, None], k, v, attn_mask=mask, scale=scale
        )
        return out[:, :, 0].to(query.dtype)

    monkeypatch.setattr(SparseKVLayer, "attend", dense_attend)
    reference = generate(model, prompts, cache=SparseKVCache(model.config, SPARSE))
    assert torch.equal(ours.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.scores, reference.scores, strict=True)) < 1e-4


def test_kernel_and_reference_paths_agree_at_50_50(model, prompts, monkeypatch):
    model.sparamx_kv = SPARSE
    ours = generate(model, prompts)
    monkeypatch.setenv("SPARAMX_ISA", "reference")
    reference = generate(model, prompts)
    assert torch.equal(ours.sequences, reference.sequences)


def test_unsupported_models_are_refused_before_any_work(model):
    with pytest.raises(ModelError, match="full attention only"):
        kv_cache.check_supported(LlamaConfig(sliding_window=64))
    with pytest.raises(ModelError, match="not 'gpt2'"):
        kv_cache.check_supported(type("Config", (), {"model_type": "gpt2"})())
    plain = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 1}))
    plain.set_attn_implementation("sdpa")
    with pytest.raises(ModelError, match="attn_implementation"):
        SparseKVCache(plain.config, SPARSE)
