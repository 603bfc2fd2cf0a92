"""The blocked greedy coreset picks exactly what the one-at-a-time greedy k-center picks."""

import pytest
import torch

from defectscope.nn.coreset import greedy_coreset, random_projection
from defectscope.nn.knn import NearestNeighbors


def sequential_greedy(points: torch.Tensor, n_select: int, start: int) -> list[int]:
    """Textbook greedy k-center: after each pick, recompute every point's distance to the new center."""
    points = points.double()
    selected = [start]
    min_dist = ((points - points[start]) ** 2).sum(1)
    for _ in range(n_select - 1):
        nxt = int(torch.argmax(min_dist))
        selected.append(nxt)
        min_dist = torch.minimum(min_dist, ((points - points[nxt]) ** 2).sum(1))
    return selected


@pytest.mark.parametrize("block", [1, 8, 64])
def test_blocked_greedy_matches_sequential(block: int) -> None:
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(40, 24, generator=gen) * 4
    points = centers[torch.randint(40, (3000,), generator=gen)] + torch.rand(3000, 24, generator=gen)
    picks = greedy_coreset(points, 300, projection_dim=128, block=block, seed=3)
    reference = sequential_greedy(points, 300, int(picks[0]))
    assert len(set(picks.tolist())) == 300
    assert set(picks.tolist()) == set(reference)


def test_coreset_covers_better_than_random() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(4000, 16, generator=gen), torch.randn(20, 16, generator=gen) + 12.0])
    picks = greedy_coreset(points, 100, seed=0)
    radius = NearestNeighbors(points[picks]).search(points, 1)[0].max()
    random_pick = torch.randperm(points.shape[0], generator=gen)[:100]
    random_radius = NearestNeighbors(points[random_pick]).search(points, 1)[0].max()
    assert radius < 0.7 * random_radius
    # the far-away cluster is always represented
    assert (picks >= 4000).any()


def test_random_projection_keeps_small_inputs_and_reduces_large() -> None:
    x = torch.randn(10, 64)
    assert torch.equal(random_projection(x, 128, 0), x)
    y = random_projection(torch.randn(500, 512), 128, 0)
    assert y.shape == (500, 128)


def test_invalid_selection_size() -> None:
    with pytest.raises(ValueError):
        greedy_coreset(torch.randn(10, 4), 11)


def test_knn_exact_against_bruteforce() -> None:
    gen = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(500, 32, generator=gen), torch.randn(50, 32, generator=gen)
    dist, idx = NearestNeighbors(bank).search(queries, 3)
    brute = torch.cdist(queries, bank)
    ref_dist, ref_idx = brute.topk(3, largest=False)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(dist, ref_dist, atol=1e-4)


def test_inverted_file_search_is_close_to_exact() -> None:
    gen = torch.Generator().manual_seed(4)
    centers = torch.randn(200, 32, generator=gen) * 3
    bank = centers[torch.randint(200, (20000,), generator=gen)] + torch.randn(20000, 32, generator=gen)
    queries = centers[torch.randint(200, (2000,), generator=gen)] + torch.randn(2000, 32, generator=gen)
    exact_d, exact_i = NearestNeighbors(bank, exact=True).search(queries)
    approx_d, approx_i = NearestNeighbors(bank).search(queries)
    assert (approx_i == exact_i).float().mean() >= 0.9
    assert (approx_d >= exact_d - 1e-4).all()  # never closer than the true nearest neighbour
    assert (approx_d - exact_d).mean() < 0.02 * exact_d.mean()
