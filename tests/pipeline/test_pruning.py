import pytest
import torch

from sparamx.pipeline.pruning import (
    apply_mask_,
    magnitude_scores,
    nm_mask,
    prune_mask,
    refit_kept_weights,
    unstructured_mask,
    wanda_scores,
    wanda_sweep,
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


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    return torch.randn(tokens, cols, generator=gen) @ mix * torch.rand(cols, generator=gen) * 3


@pytest.mark.parametrize("block", [1, 5, 128])
def test_refit_leaves_a_full_mask_alone_and_zeroes_only_the_pruned(block):
    x = correlated_inputs(500, 37)
    w = torch.randn(9, 37)
    mask = unstructured_mask(wanda_scores(w, x.square().sum(0)), 0.5)
    mask[2] = True  # a full row: nothing to compensate, it must come back as it was
    mask[4] = False  # an empty row stays empty
    refit = refit_kept_weights(w, mask, x.T @ x, block=block)
    assert refit.dtype == torch.float32 and refit.shape == w.shape
    assert (refit[~mask] == 0).all() and (refit[4] == 0).all()
    torch.testing.assert_close(refit[2], w[2], rtol=1e-5, atol=1e-5)
    # The block size only regroups the same arithmetic.
    torch.testing.assert_close(refit, refit_kept_weights(w, mask, x.T @ x, block=37), rtol=1e-4, atol=1e-4)


def test_refit_of_the_last_column_alone_is_the_exact_least_squares_fix():
    """Pruning only the last input leaves no later column to move, so nothing changes; pruning only the first one
    lets every other column compensate: that is the row's exact least-squares optimum on the kept columns."""
    x = correlated_inputs(800, 12, seed=2)
    w = torch.randn(3, 12)
    last = torch.ones(3, 12, dtype=torch.bool)
    last[:, -1] = False
    torch.testing.assert_close(refit_kept_weights(w, last, x.T @ x, damp=1e-9), w * last, rtol=1e-4, atol=1e-5)
    first = torch.ones(3, 12, dtype=torch.bool)
    first[:, 0] = False
    refit = refit_kept_weights(w, first, x.T @ x, damp=1e-9)
    best = torch.linalg.lstsq(x[:, 1:].double(), (x @ w.T).double()).solution.T
    torch.testing.assert_close(refit[:, 1:].double(), best, rtol=1e-3, atol=1e-4)


def test_refit_lowers_the_output_error_of_the_same_mask():
    x = correlated_inputs(2000, 64, seed=1)
    w = torch.randn(32, 64)
    mask = unstructured_mask(wanda_scores(w, x.square().sum(0)), 0.5)
    masked = w * mask
    refit = refit_kept_weights(w, mask, x.T @ x)
    error = lambda v: float((x @ (w - v).T).norm())  # noqa: E731
    # Each step of the sweep is the optimal compensation of one removed weight by the columns after it: never worse
    # than not compensating at all.
    assert error(refit) < error(masked)
    assert ((refit != 0) <= mask).all()


def test_refit_rejects_mismatched_shapes():
    w, mask = torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="gram must have shape \\(6, 6\\)"):
        refit_kept_weights(w, mask, torch.eye(5))
    with pytest.raises(ValueError, match="mask shape"):
        refit_kept_weights(w, mask[:, :5], torch.eye(6))


@pytest.mark.parametrize("cols, block", [(37, 16), (300, 128), (64, 128), (130, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
def test_wanda_sweep_drops_exactly_the_row_count(cols, block, sparsity):
    x = correlated_inputs(400, cols, seed=3)
    w = torch.randn(6, cols)
    out = wanda_sweep(w, x.T @ x, sparsity, block=block)
    assert ((out == 0).sum(dim=1) == int(cols * sparsity)).all()  # randn weights: no kept weight lands on 0


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_wanda_sweep_keeps_the_n_m_pattern(n, m):
    x = correlated_inputs(400, 64, seed=4)
    out = wanda_sweep(torch.randn(5, 64), x.T @ x, 1 - n / m, nm=(n, m), block=16)
    assert ((out.view(5, -1, m) != 0).sum(dim=2) == n).all()
    with pytest.raises(ValueError, match="multiple of M=8"):
        wanda_sweep(torch.randn(5, 64), x.T @ x, 0.5, nm=(4, 8), block=12)


def test_wanda_sweep_in_one_block_is_wanda_then_refit():
    """With one block the mask is chosen before any update, from the original weights: plain Wanda's mask, refit."""
    x = correlated_inputs(600, 48, seed=5)
    w, gram = torch.randn(7, 48), x.T @ x
    mask = unstructured_mask(wanda_scores(w, x.square().sum(0)), 0.5)
    torch.testing.assert_close(wanda_sweep(w, gram, 0.5, block=48), refit_kept_weights(w, mask, gram, block=48))


def test_wanda_sweep_beats_plain_wanda_on_the_calibration_outputs():
    x = correlated_inputs(2000, 96, seed=6)
    w = torch.randn(32, 96)
    error = lambda v: float((x @ (w - v).T).norm())  # noqa: E731
    plain = w * unstructured_mask(wanda_scores(w, x.square().sum(0)), 0.5)
    assert error(wanda_sweep(w, x.T @ x, 0.5, block=32)) < error(plain)
