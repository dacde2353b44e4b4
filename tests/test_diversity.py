"""Greedy k-center diversity selection (todre stage 1, divprune): correctness and memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compressors import Budget, CompressionContext, SpecError, VisualTokens, parse_spec
from compressors.diversity import select_diverse_tokens


def brute_force_k_center(embeds: torch.Tensor, keep: int) -> list[int]:
    """O(k N^2) reference in the style of the official DivPrune code: the full distance matrix,
    the seed's nearest-neighbour distance as each column's 2nd-smallest entry (the smallest is
    the token itself), then each step recomputes the min over all chosen rows."""
    unit = torch.nn.functional.normalize(embeds, dim=1)
    distance = 1 - unit @ unit.T  # [N, N]
    distance.fill_diagonal_(0.0)
    chosen = [int(torch.topk(distance, 2, dim=0, largest=False).values[1].argmax())]
    while len(chosen) < keep:
        scores = distance[chosen].min(dim=0).values
        scores[chosen] = -torch.inf
        chosen.append(int(scores.argmax()))
    return chosen


@pytest.mark.parametrize("n, d, keep, seed", [(7, 3, 3, 0), (50, 8, 10, 1), (129, 5, 40, 2), (64, 16, 64, 3)])
def test_k_center_matches_brute_force_reference_step_by_step(n, d, keep, seed):
    embeds = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    assert select_diverse_tokens(embeds, keep).tolist() == brute_force_k_center(embeds, keep)


def test_seed_is_the_most_isolated_token_and_next_is_the_farthest_from_it():
    # Three tight pairs and one loner: the loner seeds, then the pairs are covered one each.
    points = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 0.99, 0.0],
                           [0.0, 0.0, 1.0], [0.0, 0.1, 0.99], [-1.0, -1.0, -1.0]])

    chosen = select_diverse_tokens(points, 4).tolist()

    assert chosen[0] == 6
    assert sorted(index // 2 for index in chosen[1:]) == [0, 1, 2]


def test_equal_distances_go_to_the_lowest_index_and_duplicates_are_never_chosen_twice():
    basis = torch.eye(4)  # every pair at distance 1
    assert select_diverse_tokens(basis, 4).tolist() == [0, 1, 2, 3]
    duplicates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    chosen = select_diverse_tokens(duplicates, 3).tolist()
    assert chosen == [0, 2, 1]  # after both directions, every remaining token is at distance 0


def test_twenty_thousand_tokens_never_allocate_an_n_by_n_matrix():
    n = 20_000
    embeds = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, tensor.numel())
            return out

    with LargestTensor():
        chosen = select_diverse_tokens(embeds, 32)

    assert len(set(chosen.tolist())) == 32
    assert LargestTensor.largest <= (1 << 22) + n < n * n // 50  # chunks of <= 4M similarities


def make_tokens(t=4, h=4, w=5, d=8, seed=0):
    embeds = torch.randn(t, h, w, d, generator=torch.Generator().manual_seed(seed))
    return VisualTokens.from_grid(embeds, [0.5 * i for i in range(t)])


@pytest.mark.parametrize("name, default_keep", [("todre", 8), ("divprune", 8)])
def test_without_a_budget_todre_keeps_10_percent_and_divprune_9_8_percent(name, default_keep):
    tokens = make_tokens()  # 80 tokens: round(8.0) and round(7.84)
    out = parse_spec(name).compressor.compress(tokens, CompressionContext())
    assert len(out) == default_keep


@pytest.mark.parametrize("name", ["todre", "divprune"])
def test_budgeted_selection_is_exact_and_is_the_k_center_set_in_original_order(name):
    tokens = make_tokens()
    out = parse_spec(name).compressor.compress(tokens, CompressionContext(budget=Budget(per_frame=3)))

    chosen = sorted(select_diverse_tokens(tokens.embeds, 12).tolist())
    assert len(out) == 12
    assert torch.equal(out.embeds, tokens.embeds[chosen])
    assert torch.equal(out.positions, tokens.positions[chosen])


def test_todre_carries_stage2_parameters_for_the_in_llm_hook_and_validates_them():
    spec = parse_spec("todre:stage2=true,stage2_layer=2,stage2_threshold=0.2,ratio=0.25")
    todre = spec.compressor
    assert (todre.stage2, todre.stage2_layer, todre.stage2_threshold) == (True, 2, 0.2)
    assert spec.budget == Budget(ratio=0.25)
    assert parse_spec("todre").compressor.stage2_layer == -1  # -1: chosen by the attention rule
    with pytest.raises(SpecError, match="stage2_threshold must be in"):
        parse_spec("todre:stage2_threshold=1.5")
    with pytest.raises(SpecError, match="stage2_layer must be >= -1"):
        parse_spec("todre:stage2_layer=-3")
