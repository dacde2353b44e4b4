"""VideoScan carriers: one per frame, true positions, bounded memory, frame tokens gone."""

import numpy as np
import pytest
import torch

from compressors import parse_spec
from compressors.videoscan import CarrierMemory
from eval import shapesworld as sw
from vlm.model import VLM, VLMConfig


@pytest.fixture(scope="module")
def model() -> VLM:
    return VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=3)


@pytest.fixture(scope="module")
def tokens(model):
    frames = sw.render(sw.scene_and_questions("val", 4)[0])[:6]
    return model.encode_frames(frames, np.arange(6) / 8.0)


def test_only_one_carrier_per_frame_stays_with_its_true_position(model, tokens):
    state, logits = model._prefill_with_carriers(tokens, "What colour is the circle?", CarrierMemory(64))
    per_frame = 16
    visual_positions = state.positions[state.is_visual][:, 0].tolist()
    prefix = 1  # "<user>"
    assert visual_positions == [prefix + t * (per_frame + 1) + per_frame for t in range(6)]
    assert state.frame_index[state.is_visual].tolist() == list(range(6))
    question_start = int(state.positions[~state.is_visual][1, 0])
    assert question_start == prefix + model.config.num_frames * (per_frame + 1)  # 6 frames: the trained length
    assert torch.isfinite(logits).all()


def test_a_carrier_sees_its_frame_so_changing_the_frame_changes_its_key(model, tokens):
    memory_a, memory_b = CarrierMemory(64), CarrierMemory(64)
    state_a, _ = model._prefill_with_carriers(tokens, "q", memory_a)
    changed = tokens.with_embeds(tokens.embeds.clone())
    changed.embeds[0] += 1.0  # first token of frame 0 only: the carrier mean moves a little too
    state_b, _ = model._prefill_with_carriers(changed, "q", memory_b)
    assert not torch.allclose(state_a.keys(1)[0, :, 1], state_b.keys(1)[0, :, 1])


def test_memory_holds_at_most_its_limit_dropping_the_most_redundant_adjacent_carrier(model, tokens):
    state, _ = model._prefill_with_carriers(tokens, "q", CarrierMemory(3))
    assert int(state.is_visual.sum()) == 3
    memory = CarrierMemory(2)
    base = torch.zeros(4)
    for t, direction in enumerate([torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0]),
                                   torch.tensor([0, 1.0, 0.01, 0])]):
        chunk_tokens = type(tokens).from_grid((base + direction).view(1, 1, 1, 4), [float(t)])
        memory.admit(memory.frame_chunk(chunk_tokens, first_position=10 * t))
    assert memory.carrier_positions == [1, 21]  # frames 1 and 2 were the most alike: frame 1 went


def test_videoscan_spec_answers_and_reports_one_token_per_frame(model, tokens):
    answer = model.answer_tokens(tokens, "What colour is the circle?", "videoscan", model.default_sampling(3))
    assert answer.visual_before == 96 and answer.visual_after == 6
    bounded = model.answer_tokens(tokens, "What colour is the circle?", "videoscan:memory=4", model.default_sampling(3))
    assert bounded.visual_after == 4
    with pytest.raises(Exception, match="memory"):
        parse_spec("videoscan:memory=0")
