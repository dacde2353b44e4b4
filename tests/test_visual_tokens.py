"""VisualTokens: metadata built from a grid, select, merge, and shape validation."""

import dataclasses

import pytest
import torch

from compressors import VisualTokens


def make_tokens(t=2, h=3, w=4, d=5, position_style="1d", seed=0) -> VisualTokens:
    embeds = torch.randn(t, h, w, d, generator=torch.Generator().manual_seed(seed))
    return VisualTokens.from_grid(embeds, [0.5 * i for i in range(t)], position_style)


def test_from_grid_1d_orders_tokens_row_major_frame_by_frame():
    embeds = torch.randn(2, 3, 4, 5)
    tokens = VisualTokens.from_grid(embeds, torch.tensor([0.0, 0.25]))

    assert len(tokens) == 24 and tokens.dim == 5
    assert tokens.grid_thw == (2, 3, 4)
    assert tokens.span_length == 24
    assert tokens.num_frames == 2
    # Token 17 = frame 1, row 1, col 1 (17 = 1*12 + 1*4 + 1).
    assert torch.equal(tokens.embeds[17], embeds[1, 1, 1])
    assert tokens.frame_index[17] == 1
    assert tokens.grid_rc[17].tolist() == [1, 1]
    assert tokens.timestamp_s[17].item() == 0.25
    assert tokens.positions.shape == (24, 1)
    assert torch.equal(tokens.positions[:, 0], torch.arange(24))
    assert tokens.frame_index.dtype == torch.int64
    assert tokens.timestamp_s.dtype == torch.float64
    assert tokens.score is None


def test_from_grid_mrope_gives_time_row_col_positions_and_qwen_span_length():
    tokens = make_tokens(t=3, h=2, w=5, position_style="mrope")

    assert tokens.positions.shape == (30, 3)
    assert tokens.positions[0].tolist() == [0, 0, 0]
    assert tokens.positions[29].tolist() == [2, 1, 4]
    # Token 13 = frame 1, row 0, col 3.
    assert tokens.positions[13].tolist() == [1, 0, 3]
    assert torch.equal(tokens.positions[:, 0], tokens.frame_index)
    assert torch.equal(tokens.positions[:, 1:], tokens.grid_rc)
    # Qwen2-VL: text after the span starts at max(position) + 1 = max(T, H, W).
    assert tokens.span_length == 5 == int(tokens.positions.max()) + 1


def test_from_grid_rejects_unknown_position_style_and_wrong_timestamp_count():
    with pytest.raises(ValueError, match="position_style"):
        VisualTokens.from_grid(torch.randn(1, 2, 2, 3), [0.0], position_style="2d")
    with pytest.raises(ValueError, match="one entry per frame"):
        VisualTokens.from_grid(torch.randn(2, 2, 2, 3), [0.0])


def test_select_keeps_original_order_metadata_and_positions():
    tokens = make_tokens(position_style="mrope")
    tokens = dataclasses.replace(tokens, score=torch.arange(24, dtype=torch.float32))

    kept = tokens.select(torch.tensor([20, 3, 14]))

    assert len(kept) == 3
    assert torch.equal(kept.embeds, tokens.embeds[[3, 14, 20]])
    assert kept.frame_index.tolist() == [0, 1, 1]
    assert kept.grid_rc.tolist() == [[0, 3], [0, 2], [2, 0]]
    assert kept.positions.tolist() == [[0, 0, 3], [1, 0, 2], [1, 2, 0]]
    assert kept.timestamp_s.tolist() == [0.0, 0.5, 0.5]
    assert kept.score.tolist() == [3.0, 14.0, 20.0]
    # The uncompressed span is unchanged: positions are never renumbered.
    assert kept.grid_thw == tokens.grid_thw and kept.span_length == tokens.span_length
    assert kept.num_frames == 2


def test_select_accepts_a_bool_mask():
    tokens = make_tokens()
    mask = tokens.frame_index == 1

    kept = tokens.select(mask)

    assert torch.equal(kept.positions[:, 0], torch.arange(12, 24))


def test_select_refuses_duplicate_and_out_of_range_indices():
    tokens = make_tokens()
    with pytest.raises(ValueError, match="unique"):
        tokens.select([1, 2, 1])
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        tokens.select([0, 24])
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        tokens.select([-1])


def test_merge_takes_weighted_mean_and_metadata_of_heaviest_member():
    tokens = make_tokens(t=1, h=2, w=3, d=4)  # 6 tokens
    groups = torch.tensor([0, 2, 0, 2, 1, 0])
    weights = torch.tensor([1.0, 2.0, 3.0, 2.0, 0.0, 0.0])

    merged = tokens.merge(groups, weights)

    e = tokens.embeds
    # Representatives: group 0 -> token 2 (weight 3), group 1 -> token 4 (only member),
    # group 2 -> token 1 (ties with token 3; lowest index wins). Output ordered 1, 2, 4.
    assert merged.positions[:, 0].tolist() == [1, 2, 4]
    assert merged.grid_rc.tolist() == [[0, 1], [0, 2], [1, 1]]
    expected = torch.stack([(e[1] + e[3]) / 2, (1 * e[0] + 3 * e[2]) / 4, e[4]])
    torch.testing.assert_close(merged.embeds, expected)


def test_merge_with_all_zero_weights_takes_plain_mean_and_first_member():
    tokens = make_tokens(t=1, h=1, w=4, d=3)
    merged = tokens.merge(torch.tensor([0, 1, 0, 1]), torch.zeros(4))

    e = tokens.embeds
    torch.testing.assert_close(merged.embeds, torch.stack([(e[0] + e[2]) / 2, (e[1] + e[3]) / 2]))
    assert merged.positions[:, 0].tolist() == [0, 1]


def test_merge_refuses_empty_groups_and_negative_weights():
    tokens = make_tokens(t=1, h=1, w=3)
    with pytest.raises(ValueError, match="at least one member"):
        tokens.merge(torch.tensor([0, 2, 2]), torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        tokens.merge(torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0, 1.0]))


def test_with_embeds_and_to_keep_metadata_and_change_only_embeds_dtype():
    tokens = make_tokens()

    projected = tokens.with_embeds(torch.zeros(24, 9))
    halved = tokens.to(dtype=torch.float16)

    assert projected.dim == 9 and torch.equal(projected.positions, tokens.positions)
    assert halved.dtype == torch.float16
    assert halved.timestamp_s.dtype == torch.float64
    assert halved.positions.dtype == torch.int64
    assert halved.device == torch.device("cpu")


def test_construction_refuses_inconsistent_shapes():
    tokens = make_tokens()
    with pytest.raises(ValueError, match="frame_index"):
        dataclasses.replace(tokens, frame_index=tokens.frame_index[:-1])
    with pytest.raises(ValueError, match="grid_rc"):
        dataclasses.replace(tokens, grid_rc=tokens.grid_rc[:, :1])
    with pytest.raises(ValueError, match="positions"):
        dataclasses.replace(tokens, positions=tokens.positions[:, 0])
    with pytest.raises(ValueError, match="timestamp_s"):
        dataclasses.replace(tokens, timestamp_s=tokens.timestamp_s.float())
    with pytest.raises(ValueError, match="score"):
        dataclasses.replace(tokens, score=torch.zeros(3))
    with pytest.raises(ValueError, match="grid_thw"):
        dataclasses.replace(tokens, grid_thw=(2, 3))
    with pytest.raises(ValueError, match="embeds"):
        tokens.with_embeds(torch.zeros(24))
    with pytest.raises(ValueError, match="frame_index"):
        tokens.with_embeds(torch.zeros(23, 5))


def test_visual_tokens_are_immutable():
    tokens = make_tokens()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tokens.span_length = 3
