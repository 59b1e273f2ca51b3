import pytest
import torch

from sparamx.pipeline.pruning import (
    apply_mask_,
    magnitude_scores,
    nm_mask,
    prune_mask,
    unstructured_mask,
    wanda_scores,
)


@pytest.mark.parametrize("cols", [1, 7, 576, 1000])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_row_mask_drops_exactly_the_lowest_per_row(cols, sparsity):
    scores = torch.rand(13, cols)
    mask = unstructured_mask(scores, sparsity, "row")
    k = int(cols * sparsity)
    assert (mask.sum(dim=1) == cols - k).all()
    if 0 < k < cols:
        assert (scores[~mask].view(13, k).max(dim=1).values <= scores[mask].view(13, -1).min(dim=1).values).all()


def test_layer_mask_counts_over_the_whole_matrix():
    scores = torch.rand(10, 30)
    scores[0] += 10  # row 0 dominates: a layer-wide comparison keeps all of it
    mask = unstructured_mask(scores, 0.5, "layer")
    assert int((~mask).sum()) == 150 and mask[0].all()


def test_unstructured_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_mask(torch.rand(2, 2), 1.0)
    with pytest.raises(ValueError, match="group"):
        unstructured_mask(torch.rand(2, 2), 0.5, "column")


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("cols", [8, 16, 576, 13])
def test_nm_mask_keeps_n_best_of_every_m(n, m, cols):
    scores = torch.rand(5, cols)
    mask = nm_mask(scores, n, m)
    full = cols - cols % m
    groups = mask[:, :full].reshape(5, -1, m)
    assert (groups.sum(dim=2) == n).all()
    kept_min = torch.where(groups, scores[:, :full].reshape(5, -1, m), torch.inf).min(dim=2).values
    dropped_max = torch.where(~groups, scores[:, :full].reshape(5, -1, m), -torch.inf).max(dim=2).values
    assert (kept_min >= dropped_max).all()
    tail = cols % m
    if tail:
        assert (mask[:, full:].sum(dim=1) == min(n, tail)).all()


def test_nm_mask_rejects_n_not_below_m():
    for n, m in [(4, 4), (5, 4), (0, 4)]:
        with pytest.raises(ValueError, match="N:M"):
            nm_mask(torch.rand(2, 8), n, m)


def test_wanda_scores_weigh_by_input_norm():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    sq = torch.tensor([100.0, 1.0, 0.0, 4.0])
    assert torch.allclose(wanda_scores(weight, sq), torch.tensor([[10.0, 2.0, 0.0, 1.0]]))
    assert torch.equal(magnitude_scores(weight), weight.abs())
    # Magnitude would drop 1.0 and 0.5; Wanda keeps the weight whose input is large and drops the dead column.
    assert prune_mask(wanda_scores(weight, sq), 0.5, None).tolist() == [[True, True, False, False]]
    assert prune_mask(magnitude_scores(weight), 0.5, None).tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="input_sq_norm"):
        wanda_scores(weight, torch.ones(3))


def test_apply_mask_zeroes_in_place():
    weight = torch.ones(2, 3)
    apply_mask_(weight, torch.tensor([[True, False, True], [False, False, True]]))
    assert weight.tolist() == [[1, 0, 1], [0, 0, 1]]
