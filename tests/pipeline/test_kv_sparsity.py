"""KV sparsity: the per-token magnitude pruning and packing, and the settings' validation."""

import pytest
import torch

from sparamx.pipeline.errors import RecipeError
from sparamx.pipeline.kv_sparsity import (
    KVConfig,
    kept_elements,
    pack_bits,
    parse_kv_sparsity,
    prune_pack,
    unpack,
    unpack_bits,
)
from sparamx.pipeline.recipe import Recipe, load_recipe


@pytest.mark.parametrize("d, keep", [(64, 32), (64, 1), (64, 64), (128, 38), (8, 3)])
def test_each_vector_keeps_its_largest_magnitudes(d, keep):
    x = torch.randn(2, 3, 17, d).bfloat16()
    values, masks = prune_pack(x, keep)
    assert values.shape == (2, 3, 17, keep) and masks.shape == (2, 3, 17, d // 8) and masks.dtype == torch.uint8
    dense = unpack(values, masks)
    kept = unpack_bits(masks)
    assert (kept.sum(-1) == keep).all()
    assert torch.equal(dense, torch.where(kept, x, torch.zeros_like(x)))
    dropped_max = x.abs().float().masked_fill(kept, 0).amax(-1)
    kept_min = x.abs().float().masked_fill(~kept, float("inf")).amin(-1)
    assert (dropped_max <= kept_min).all()


@pytest.mark.parametrize("d, keep", [(64, 32), (32, 1), (128, 38), (8, 3)])
def test_k_tiles_hold_the_same_values_dim_pairs_major(d, keep):
    x = torch.randn(2, 3, 32, d).bfloat16()
    values, masks = prune_pack(x, keep)
    tiled_values, tiled_masks = prune_pack(x, keep, tile=16)
    assert tiled_values.shape == values.shape and tiled_masks.shape == masks.shape
    assert torch.equal(unpack(tiled_values, tiled_masks, tile=16), unpack(values, masks))
    # the first tile of the first head, by hand: row r's word has bit 2j + e for token j's element 2r + e
    kept = unpack_bits(masks[0, 0, :16])
    word = int.from_bytes(bytes(tiled_masks[0, 0].flatten()[4:8].tolist()), "little")  # pair row 1
    assert word == sum(1 << (2 * j + e) for j in range(16) for e in range(2) if kept[j, 2 + e])
    in_order = [x[0, 0, j, 2 * r + e] for r in range(d // 2) for j in range(16) for e in range(2) if kept[j, 2 * r + e]]
    assert torch.equal(tiled_values[0, 0, :16].flatten(), torch.stack(in_order))


def test_k_tiles_need_whole_tiles():
    with pytest.raises(ValueError, match="tiles of 16 tokens; 20 tokens"):
        prune_pack(torch.randn(1, 1, 20, 64), 32, tile=16)


def test_bits_are_little_endian_per_byte_as_the_weights_bitmaps():
    bits = torch.zeros(16, dtype=torch.bool)
    bits[[0, 3, 9, 15]] = True
    assert pack_bits(bits).tolist() == [0b1001, 0b10000010]
    assert torch.equal(unpack_bits(pack_bits(bits)), bits)


def test_kept_elements():
    assert kept_elements(64, 0.5) == 32 and kept_elements(128, 0.7) == 38 and kept_elements(64, 0.0) == 64
    assert kept_elements(64, 0.999) == 1  # never an empty vector


@pytest.mark.parametrize(
    "data, key",
    [
        ({"k_sparsity": 1.0}, "kv.k_sparsity"),
        ({"v_sparsity": -0.1}, "kv.v_sparsity"),
        ({"k_sparsity": True}, "kv.k_sparsity"),
        ({"recent": -1}, "kv.recent"),
        ({"block": 0}, "kv.block"),
        ({"method": "random"}, "kv.method"),
        ({"sparsity": 0.5}, "kv.sparsity"),
    ],
)
def test_bad_settings_name_the_key(data, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        KVConfig.from_dict(data)
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        Recipe.from_dict({"name": "x", "kv": data})


def test_round_trip_and_the_shipped_kv_recipe():
    kv = KVConfig(k_sparsity=0.5, v_sparsity=0.3, recent=16, block=8)
    assert KVConfig.from_dict(kv.to_dict()) == kv
    recipe = load_recipe("kv-50")
    assert (recipe.kv.k_sparsity, recipe.kv.v_sparsity, recipe.kv.sparse) == (0.5, 0.5, True)
    assert not load_recipe("wanda-50").kv.sparse


def test_cli_form():
    assert parse_kv_sparsity("0.5,0.3") == (0.5, 0.3)
    assert parse_kv_sparsity("0.5") == (0.5, 0.5)
    for bad in ("0.5,1", "a,b", "0.1,0.2,0.3"):
        with pytest.raises(RecipeError):
            parse_kv_sparsity(bad)
