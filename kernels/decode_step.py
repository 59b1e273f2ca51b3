"""The fused decode step sparamx.load installs: each generated token runs every decoder layer in one C++ call
(csrc/decode_layer.cpp's DecoderStack, per layer: norms, q/k/v, RoPE, our KV cache, attention, o, gate/up, SiLU,
down), in place of transformers' ~100 module calls and aten ops per layer around our kernels. q/k/v and gate/up
each run as one linear (modules.fuse_rows), their outputs split after. Prefill, and any call the step does not cover
(several tokens, inputs_embeds, labels, attention or hidden-state outputs, a cache that is not our SparseKVCache),
runs the model's own forward; so does every call with `model.sparamx_decode_step = None`. Both give the same numbers.
"""

import functools
import types

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..pipeline.errors import ModelError
from ..pipeline.models import decoder_layers
from . import cpu_paths
from .kv_cache import SparseKVCache, check_supported
from .modules import _PackedLinear, fuse_rows

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
PROJECTIONS = (*QKV, "self_attn.o_proj", *GATE_UP, "mlp.down_proj")


def _slots(linear: _PackedLinear) -> list[Tensor | None]:
    """A linear's six weight slots of the decode_layer op: values, masks, block_offsets, row_sums, scale, bias."""
    sparse = hasattr(linear, "masks")
    return [
        linear.values,
        linear.masks if sparse else None,
        linear.block_offsets if sparse else None,
        linear.row_sums,
        linear.weight_scale,
        linear.bias,
    ]


def _grouped(layer, names: tuple[str, ...]) -> list[_PackedLinear]:
    """q/k/v (or gate/up) as one fused linear where modules.fuse_rows can fuse them, else as they are."""
    parts = [layer.get_submodule(name) for name in names]
    fused = fuse_rows(parts)
    return [fused] if fused is not None else parts


def _layer_args(index: int, layer) -> tuple[list[Tensor | None], list[int]]:
    """The weights list and shapes of one layer's decode_layer op (fusing its q/k/v and gate/up)."""
    unpacked = [name for name in PROJECTIONS if not isinstance(layer.get_submodule(name), _PackedLinear)]
    if unpacked:
        raise ModelError(f"the fused decode step needs our kernels: layer {index}'s {unpacked[0]} is not packed")
    qkv, gate_up = _grouped(layer, QKV), _grouped(layer, GATE_UP)
    weights = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    shapes = [len(qkv), len(gate_up)]
    for linear in (*qkv, layer.self_attn.o_proj, *gate_up, layer.mlp.down_proj):
        weights += _slots(linear)
        shapes += [linear.out_features, linear.in_features, int(linear.x_symmetric)]
    return weights, shapes


class DecodeStep:
    """A model's decode step: per decoder layer the arguments of its decode_layer op, built once at load and held by
    a DecoderStack. It keeps the weights it was built with: a model changed after load (.to(), weights replaced)
    needs a new DecodeStep, or model.sparamx_decode_step = None."""

    def __init__(self, model):
        config = model.config
        check_supported(config)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ModelError(f"the fused decode step runs SiLU MLPs, not {config.hidden_act!r}")
        dtype = model.get_input_embeddings().weight.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ModelError(f"the fused decode step runs float32 or bfloat16 models, not {dtype}")
        layers = decoder_layers(model)
        eps = {
            norm.variance_epsilon
            for layer in layers
            for norm in (layer.input_layernorm, layer.post_attention_layernorm)
        }
        if len(eps) != 1:
            raise ModelError(f"the fused decode step needs one RMSNorm epsilon, this model has {sorted(eps)}")
        norms = {n.weight.dtype for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)}
        if norms != {dtype}:
            raise ModelError(
                f"the fused decode step needs {dtype} norm weights, as the model's; got {sorted(map(str, norms))}"
            )
        attention = layers[0].self_attn
        self.eps, self.scale = eps.pop(), attention.scaling
        self.heads = (config.num_attention_heads, config.num_key_value_heads, attention.head_dim)
        self.layers = [_layer_args(i, layer) for i, layer in enumerate(layers)]
        # The same layers held in C++, checked once here: one call runs them all for each token.
        self.stack = torch.classes.sparamx.DecoderStack(config.hidden_size, list(self.heads), self.eps, self.scale)
        for weights, shapes in self.layers:
            self.stack.add_layer(weights, shapes)

    @staticmethod
    def takes(kwargs: dict) -> bool:
        """Whether a forward call with these arguments is one decode step this op path covers."""
        ids, mask, cache = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("cache")
        return (
            ids is not None
            and ids.dim() == 2
            and ids.shape[1] == 1
            and (mask is None or mask.dim() == 2)
            and isinstance(cache, SparseKVCache)
            and all(layer.is_initialized for layer in cache.layers)
            and isinstance(kwargs.get("logits_to_keep", 0), int)
            and kwargs.get("use_cache") is not False
            and all(kwargs.get(k) is None for k in ("inputs_embeds", "labels"))
            and not any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states"))
        )

    def __call__(self, model, input_ids: Tensor, attention_mask: Tensor | None, position_ids, cache) -> Tensor:
        """Logits [B, 1, vocab] of the next token, the new token's K/V appended to `cache`."""
        base, past = model.model, cache.get_seq_length()
        hidden = base.embed_tokens(input_ids)
        if position_ids is None:  # as LlamaModel numbers a token with no position_ids given
            position_ids = torch.full((1, 1), past, dtype=torch.long)
        cos, sin = (t[:, 0].expand(hidden.shape[0], -1).contiguous() for t in base.rotary_emb(hidden, position_ids))
        valid = _valid(attention_mask, past + 1)
        kv, packed, tails = [], [], []
        for layer in cache.layers:
            *buffers, count, tail = layer.reserve_token()
            kv += buffers
            packed.append(count)
            tails.append(tail)
        h = self.stack.step(hidden[:, 0], cos, sin, kv, packed, tails, valid, cpu_paths.isa())
        for layer in cache.layers:
            layer.tail += 1
        return model.lm_head(base.norm(h)[:, None])


def _valid(attention_mask: Tensor | None, tokens: int) -> Tensor | None:
    """The attended tokens [B, tokens] (None: all), from generate()'s 2-D mask."""
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != tokens:
        raise RuntimeError(f"attention mask covers {attention_mask.shape[-1]} tokens, the cache and new token {tokens}")
    return None if bool(attention_mask.all()) else attention_mask.bool()


def install(model) -> None:
    """Make `model`'s single-token forward calls with our KV cache run the fused step (see the module docstring).
    model.sparamx_decode_step = None turns it off; the model's own forward then runs every call."""
    model.sparamx_decode_step = DecodeStep(model)
    forward = type(model).forward

    @functools.wraps(forward)  # generate() reads forward's signature (position_ids)
    def fused_forward(self, *args, **kwargs):
        step = self.sparamx_decode_step
        if step is None or args or not step.takes(kwargs):
            return forward(self, *args, **kwargs)
        logits = step(
            self, kwargs["input_ids"], kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs["cache"]
        )
        return CausalLMOutputWithPast(logits=logits, cache=kwargs["cache"])

    model.forward = types.MethodType(fused_forward, model)
