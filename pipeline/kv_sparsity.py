"""KV-cache sparsity: its settings (a recipe's `kv:` stage, recorded in sparamx.json, overridable at load) and its
math. Each cached K or V vector of one token and one KV head keeps its largest-magnitude elements over head_dim
(per-token magnitude pruning, K after RoPE: Mustafar, arXiv:2505.22913) and is packed as a head_dim-bit mask (bit b of
byte k = element 8k + b, as the weights' bitmaps) plus the kept values in element order. K is then laid out in tiles
of `tile` tokens, dim pairs major (kernels/csrc/attention_kernels.h says why; the kernel library gives the tile
size): per pair row r a 32-bit mask, bit 2j + e for token j's element 2r + e, then each row's kept values in turn.
Pure functions: no model."""

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import RecipeError

KV_METHODS = ("magnitude",)  # per token, within each head vector
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)


@dataclass
class KVConfig:
    """How the attention KV cache is sparsified at generation time. 0 / 0: a dense cache (our kernel, no pruning)."""

    k_sparsity: float = 0.0  # fraction of each cached K vector dropped
    v_sparsity: float = 0.0  # fraction of each cached V vector dropped
    method: str = "magnitude"
    recent: int = 128  # the newest tokens stay dense, unpruned
    block: int = 64  # tokens that wait in the dense tail before they are packed (in whole K tiles)

    def __post_init__(self):
        for key in ("k_sparsity", "v_sparsity"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise RecipeError(f"kv.{key} must be a number in [0, 1), got {value!r}")
        if self.method not in KV_METHODS:
            raise RecipeError(f"kv.method must be one of {', '.join(KV_METHODS)}, got {self.method!r}")
        for key, least in (("recent", 0), ("block", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise RecipeError(f"kv.{key} must be an integer >= {least}, got {value!r}")

    @property
    def sparse(self) -> bool:
        return self.k_sparsity > 0 or self.v_sparsity > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KVConfig":
        if not isinstance(data, dict):
            raise RecipeError(f"kv must be a mapping, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown key 'kv.{unknown[0]}' (expected one of: {', '.join(sorted(known))})")
        return cls(**data)


def parse_kv_sparsity(text: str) -> tuple[float, float]:
    """ "K,V" (or one number for both) as the CLI takes it -> (k_sparsity, v_sparsity), each checked."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise RecipeError(f"--kv-sparsity must be 'K,V' or one number, each in [0, 1), got {text!r}") from None
    if len(values) not in (1, 2):
        raise RecipeError(f"--kv-sparsity must be 'K,V' or one number, each in [0, 1), got {text!r}")
    k, v = values if len(values) == 2 else values * 2
    KVConfig(k_sparsity=k, v_sparsity=v)  # validates
    return k, v


def kept_elements(head_dim: int, sparsity: float) -> int:
    """How many of a head vector's head_dim elements a token keeps at `sparsity` (at least one)."""
    return max(1, head_dim - round(sparsity * head_dim))


def pack_bits(bits: Tensor) -> Tensor:
    """bool [..., d] (d % 8 == 0) -> uint8 [..., d / 8], bit b of byte k = element 8k + b."""
    grouped = bits.reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8).to(torch.uint8)
    return (grouped * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def unpack_bits(masks: Tensor) -> Tensor:
    """uint8 [..., d / 8] -> bool [..., d], the inverse of pack_bits."""
    return ((masks.unsqueeze(-1) & _BIT_WEIGHTS) != 0).flatten(-2)


def prune_pack(x: Tensor, keep: int, tile: int | None = None) -> tuple[Tensor, Tensor]:
    """Vectors x [..., n, d] -> (values [..., n, keep], masks uint8 [..., n, d / 8]): each keeps its `keep` largest
    |x| (ties: the lower index first, as topk of a stable sort would). Token by token, or in tiles of `tile` tokens
    (n a multiple of it), as the kernel reads K."""
    d = x.shape[-1]
    if d % 8:
        raise ValueError(f"KV sparsity needs head_dim % 8 == 0, got {d}")
    order = x.abs().float().argsort(dim=-1, descending=True, stable=True)
    index = order[..., :keep].sort(dim=-1).values
    bits = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(-1, index, True)
    if tile is None:
        return x.gather(-1, index), pack_bits(bits)
    rows = _pair_rows(bits, tile)
    return _pair_rows(x, tile)[rows].reshape(index.shape), pack_bits(rows.flatten(-2)).reshape(*x.shape[:-1], d // 8)


def unpack(values: Tensor, masks: Tensor, tile: int | None = None) -> Tensor:
    """(values, masks) as prune_pack gave them (with the same `tile`) -> dense [..., n, d], zeros where nothing was
    kept."""
    if tile is None:
        bits = unpack_bits(masks)
        return torch.zeros(bits.shape, dtype=values.dtype, device=values.device).masked_scatter_(bits, values)
    *lead, n, nbytes = masks.shape
    d = nbytes * 8
    rows = unpack(values, masks.reshape(*lead, n // tile, d // 2, tile // 4))  # each pair row's mask word, unpacked
    return rows.reshape(*lead, n // tile, d // 2, tile, 2).transpose(-3, -2).reshape(*lead, n, d)


def _pair_rows(x: Tensor, tile: int) -> Tensor:
    """[..., n, d] -> [..., n / tile, d / 2, tile, 2]: each tile's tokens, dim pairs major."""
    *lead, n, d = x.shape
    if n % tile:
        raise ValueError(f"packed K comes in tiles of {tile} tokens; {n} tokens are not a whole number of them")
    return x.reshape(*lead, n // tile, tile, d // 2, 2).transpose(-3, -2)
