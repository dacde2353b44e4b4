"""Properties every registered pre-LLM compressor must have, parametrized from the registry.

A newly registered compressor is tested here automatically: it must meet budgets exactly
(unless listed in SIZE_RULES with the size it promises instead), work on images and videos,
be deterministic under a seed, and give every output token the frame, grid cell, timestamp
and ORIGINAL position of one of its input tokens. Selection methods (whose outputs are input
tokens) must also give logits identical to `none` when the budget keeps every token.
"""

import math

import numpy as np
import pytest
import torch

from compressors import Budget, CompressionContext, VisualTokens, list_compressors, parse_spec
from vlm.model import VLM, VLMConfig

PRE_LLM = [info.name for info in list_compressors() if info.stage == "pre_llm"]
QUESTION = "what colour is the circle ?"

# Methods whose size is not budget.resolve(N, F) by design: name -> (tokens, kept) -> ok.
SIZE_RULES = {
    "none": lambda tokens, kept: len(kept) == len(tokens),
    "avgpool": lambda tokens, kept: len(kept) == tokens.grid_thw[0] * math.prod(
        math.ceil(side / 2) for side in tokens.grid_thw[1:]),  # factor 2
    "uniform": lambda tokens, kept: len(kept) % math.prod(tokens.grid_thw[1:]) == 0,  # whole frames
}
BUDGETS = [Budget(ratio=0.5), Budget(ratio=0.1), Budget(tokens=6), Budget(per_frame=1), Budget(per_frame=2)]
GRIDS = {  # name -> (grid (T, H, W), position style)
    "image": ((1, 4, 4), "1d"),
    "video": ((16, 4, 4), "1d"),
    "odd-mrope": ((3, 5, 6), "mrope"),
}


@pytest.fixture(scope="module")
def model() -> VLM:
    """The model handle learned and question-aware methods read (random-init vidsieve-tiny)."""
    return VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=0)


def make_tokens(grid, style, dim=128, seed=0) -> VisualTokens:
    embeds = torch.randn(*grid, dim, generator=torch.Generator().manual_seed(seed))
    return VisualTokens.from_grid(embeds, [0.25 * t for t in range(grid[0])], style)


def compress(name, tokens, budget, model, seed=0) -> VisualTokens:
    compressor = parse_spec(name).compressor  # a fresh instance: no state carried between calls
    return compressor.compress(tokens, CompressionContext(QUESTION, budget=budget, seed=seed, model=model))


def metadata_rows(tokens: VisualTokens) -> torch.Tensor:
    """[N, 4 + P] (frame, row, col, timestamp in ms, positions...) of each token."""
    milliseconds = (tokens.timestamp_s * 1000).round().long()
    columns = [tokens.frame_index[:, None], tokens.grid_rc, milliseconds[:, None], tokens.positions]
    return torch.cat(columns, dim=1)


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("name", PRE_LLM)
def test_budgets_are_met_exactly_or_as_the_method_promises(name, grid_name, model):
    tokens = make_tokens(*GRIDS[grid_name])
    for budget in BUDGETS:
        kept = compress(name, tokens, budget, model)
        keep = budget.resolve(len(tokens), tokens.num_frames)
        if name in SIZE_RULES:
            assert SIZE_RULES[name](tokens, kept), f"{name} under {budget}: {len(kept)} tokens"
        else:
            assert len(kept) == keep, f"{name} under {budget} on {grid_name}: {len(kept)} != {keep}"
        assert kept.dim == tokens.dim


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("name", PRE_LLM)
def test_every_output_token_keeps_some_input_tokens_frame_grid_time_and_position(name, grid_name, model):
    grid, style = GRIDS[grid_name]
    tokens = make_tokens(grid, style)
    for budget in (Budget(ratio=0.25), Budget(per_frame=1)):
        kept = compress(name, tokens, budget, model)
        rows = metadata_rows(tokens)
        out = metadata_rows(kept)
        matches = (out[:, None, :] == rows[None, :, :]).all(-1)  # [K, N]
        assert bool(matches.any(1).all()), f"{name}: an output token has metadata no input token has"
        assert (kept.grid_thw, kept.span_length) == (tokens.grid_thw, tokens.span_length)
        assert bool((kept.positions >= 0).all()) and bool((kept.positions < tokens.span_length).all())
        source = matches.float().argmax(1)  # the input token each output token stands for
        assert bool((source[1:] >= source[:-1]).all()), f"{name}: tokens left their original order"


@pytest.mark.parametrize("name", PRE_LLM)
def test_output_is_deterministic_under_a_seed(name, model):
    tokens = make_tokens((8, 4, 4), "1d")
    a = compress(name, tokens, Budget(ratio=0.25), model, seed=7)
    b = compress(name, tokens, Budget(ratio=0.25), model, seed=7)
    assert torch.equal(a.embeds, b.embeds)
    assert torch.equal(metadata_rows(a), metadata_rows(b))


def is_selection_method(name, model) -> bool:
    """Whether the method's outputs are some of its input tokens, unchanged."""
    tokens = make_tokens((4, 4, 4), "1d", seed=1)
    kept = compress(name, tokens, Budget(ratio=0.5), model)
    return bool((kept.embeds[:, None, :] == tokens.embeds[None, :, :]).all(-1).any(1).all())


@pytest.mark.parametrize("name", PRE_LLM)
def test_selection_methods_keeping_every_token_give_the_logits_of_none(name, model):
    if not is_selection_method(name, model):
        pytest.skip(f"{name} builds new tokens rather than selecting input tokens")
    frames = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    tokens = model.encode_frames(frames, [0.0, 0.5, 1.0])

    logits = {}
    for text in ("none", f"{name}:ratio=1.0"):
        prompt = model.prepare(tokens, QUESTION, parse_spec(text))
        assert prompt.visual_after == len(tokens)
        _, logits[text] = model.runner.prefill(prompt.embeds, prompt.positions, is_visual=prompt.is_visual,
                                               frame_index=prompt.frame_index)
    torch.testing.assert_close(logits[f"{name}:ratio=1.0"], logits["none"], rtol=0, atol=1e-5)
