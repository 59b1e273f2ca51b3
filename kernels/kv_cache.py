"""The KV cache and decode attention sparamx.load installs: a transformers Cache whose layers keep K and V per KV head
(never repeat_kv copies), the older tokens pruned per token by magnitude and bitmap-packed (pipeline/kv_sparsity.py)
once `recent` newer ones follow, and an attention function, registered through transformers' AttentionInterface as
"sparamx", that runs our decode_attention op on it for each generated token. Prefill keeps SDPA, over the dense
K/V. With sparsity 0 / 0 nothing is pruned: the same cache and op, dense.

transformers hands an attention function only what the cache's update returned; so in decode the layer returns the
new token's K/V with itself attached as `key.sparamx_kv`, and the attention function runs the op on that layer.
"""

import types

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..pipeline.errors import ModelError
from ..pipeline.kv_sparsity import KVConfig, kept_elements, prune_pack, unpack
from . import ops

ATTENTION = "sparamx"  # the name our attention function and its mask function are registered under
SUPPORTED_MODEL_TYPES = ("llama",)  # RoPE applied before cache.update, full attention in every layer


class _Stream:
    """K or V of one layer: the packed tokens' values [B, H, cap, keep] and masks [B, H, cap, head_dim / 8], in K
    tiles of `tile` tokens or (tile None) token by token, and the dense tail [B, H, cap_tail, head_dim]; each buffer
    has room for more tokens than it holds."""

    def __init__(self, like: Tensor, keep: int, tile: int | None):
        b, h, _, d = like.shape
        self.keep, self.tile = keep, tile
        self.values = like.new_zeros((b, h, 0, keep), dtype=torch.bfloat16)
        self.masks = like.new_zeros((b, h, 0, d // 8), dtype=torch.uint8)
        # fp32 models keep their dense tokens exact; every other dtype is stored as bf16, as the packed values are
        self.tail = like.new_zeros((b, h, 0, d), dtype=torch.float32 if like.dtype == torch.float32 else torch.bfloat16)

    @property
    def buffers(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.values, self.masks, self.tail

    def map(self, fn) -> None:
        self.values, self.masks, self.tail = (fn(t) for t in self.buffers)


def _room(buffer: Tensor, tokens: int) -> Tensor:
    """buffer with room for `tokens` tokens along dim 2 (growing by half again, so appends are amortized O(1))."""
    if buffer.shape[2] >= tokens:
        return buffer
    grown = buffer.new_zeros((*buffer.shape[:2], max(tokens, buffer.shape[2] * 3 // 2, 64), buffer.shape[3]))
    grown[:, :, : buffer.shape[2]] = buffer
    return grown


class SparseKVLayer(CacheLayerMixin):
    """One decoder layer's cache: `packed` pruned tokens (bf16 values), then `tail` dense ones (the newest)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, kv: KVConfig):
        super().__init__()
        self.kv = kv
        self.packed = self.tail = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        d = key_states.shape[-1]
        if d % 8:
            raise ModelError(f"the sparamx KV cache needs head_dim % 8 == 0, got {d}")
        self.device, self.head_dim = key_states.device, d
        self.k = _Stream(key_states, kept_elements(d, self.kv.k_sparsity), ops.kv_tile())
        self.v = _Stream(value_states, kept_elements(d, self.kv.v_sparsity), None)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new tokens. Several (prefill): -> every cached token's K/V, dense, for SDPA. One (decode): ->
        the new K/V, marked for the sparamx attention function, which reads the whole cache through the op."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        self._make_room(new)
        for stream, states in ((self.k, key_states), (self.v, value_states)):
            stream.tail[:, :, self.tail : self.tail + new] = states
        self.tail += new
        if new > 1:
            return self.dense()
        key_states.sparamx_kv = self
        return key_states, value_states

    def reserve_token(self) -> tuple:
        """Room for one more token, which the fused decode step writes: -> the buffers and counts a layer's
        decode_layer step takes. The caller counts the token in (self.tail += 1) once written."""
        self._make_room(1)
        return (*self.k.buffers, *self.v.buffers, self.packed, self.tail)

    def _make_room(self, new: int) -> None:
        """Fold, then make the tails hold `new` more tokens."""
        self._fold()
        for stream in (self.k, self.v):
            stream.tail = _room(stream.tail, self.tail + new)

    def _fold(self) -> None:
        """Prune and pack all but the `recent` newest tokens, once at least `block` of them wait in the tail: as many
        as make whole K tiles."""
        tile = self.k.tile
        n = (self.tail - self.kv.recent) // tile * tile
        if not self.kv.sparse or n < max(1, self.kv.block):
            return
        for stream in (self.k, self.v):
            values, masks = prune_pack(stream.tail[:, :, :n], stream.keep, stream.tile)
            stream.values = _room(stream.values, self.packed + n)
            stream.masks = _room(stream.masks, self.packed + n)
            stream.values[:, :, self.packed : self.packed + n] = values
            stream.masks[:, :, self.packed : self.packed + n] = masks
            stream.tail[:, :, : self.tail - n] = stream.tail[:, :, n : self.tail].clone()
        self.packed += n
        self.tail -= n

    def dense(self) -> tuple[Tensor, Tensor]:
        """Every cached token's K and V as dense [B, H, tokens, head_dim] (pruned elements zero)."""
        out = []
        for stream in (self.k, self.v):
            tail = stream.tail[:, :, : self.tail]
            if self.packed:
                packed = unpack(stream.values[:, :, : self.packed], stream.masks[:, :, : self.packed], stream.tile)
                tail = torch.cat([packed, tail], dim=2)
            out.append(tail)
        return out[0], out[1]

    def attend(self, query: Tensor, valid: Tensor | None, scale: float) -> Tensor:
        """decode_attention of query [B, Hq, head_dim] over this layer's cache."""
        return ops.decode_attention(query, self.k.buffers, self.v.buffers, self.packed, self.tail, valid, scale)

    def get_seq_length(self) -> int:
        return self.packed + self.tail

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.packed = self.tail = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            for stream in (self.k, self.v):
                stream.map(lambda t: t.index_select(0, indices.to(t.device)).contiguous())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for stream in (self.k, self.v):
                stream.map(lambda t: t.repeat_interleave(repeats, dim=0).contiguous())


def check_supported(config) -> None:
    """Raise ModelError unless the sparamx cache and attention can run this model (before any work)."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"the sparamx KV cache supports model types {', '.join(SUPPORTED_MODEL_TYPES)}, not {kind!r}; "
            "load with kv_cache=False (CLI: --no-kv-cache) to use transformers' cache"
        )
    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        raise ModelError(f"the sparamx KV cache supports full attention only; this {kind} model has sliding windows")


class SparseKVCache(Cache):
    """A Cache of SparseKVLayer, one per decoder layer. Needs the model to run the "sparamx" attention (install())."""

    def __init__(self, config, kv: KVConfig):
        check_supported(config)
        if config._attn_implementation != ATTENTION:
            raise ModelError(
                f"SparseKVCache needs attn_implementation={ATTENTION!r} (sparamx.load sets it); this model runs "
                f"{config._attn_implementation!r}, whose attention would not read the packed cache"
            )
        super().__init__(layers=[SparseKVLayer(kv) for _ in range(config.num_hidden_layers)])
        self.kv = kv


def sparamx_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Decode (one query token, key from a SparseKVLayer): our op over the cache. Otherwise SDPA, as "sdpa" runs."""
    layer = getattr(key, "sparamx_kv", None)
    if layer is None or query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    valid = None
    if attention_mask is not None:
        last = attention_mask[:, 0, -1, :]
        valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
        if valid.shape[-1] != layer.get_seq_length():
            raise RuntimeError(f"attention mask covers {valid.shape[-1]} tokens, the cache {layer.get_seq_length()}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query[:, :, 0], valid, scale).unsqueeze(1), None


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """generate() gets a SparseKVCache unless the caller passed a cache, or asked for none or for another kind."""
    if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
        if generation_config.cache_implementation is None and self._supports_default_dynamic_cache():
            model_kwargs["cache"] = SparseKVCache(self.config, self.sparamx_kv)
            return None
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)


def install(model, kv: KVConfig) -> None:
    """Make `model` run the sparamx attention, and generate() use a SparseKVCache with settings `kv`."""
    check_supported(model.config)
    AttentionInterface.register(ATTENTION, sparamx_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
    model.sparamx_kv = kv
    # An instance attribute: this one model's generate() builds our cache; the class stays as transformers has it.
    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
