"""ENAT-style reuse: a video's KV serves every question; unchanged patches are not re-encoded."""

import numpy as np
import pytest
import torch

from eval import shapesworld as sw
from kernels.errors import VidsieveError
from vlm.encoder import PatchReuseEncoder
from vlm.model import VLM, VLMConfig
from vlm.reuse import ReuseSpec, ReuseSpecError

QUESTIONS = ["What colour is the circle?", "How many objects are there at the end?", "Which direction does the square move?"]


@pytest.fixture(scope="module")
def model() -> VLM:
    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=1)
    with torch.no_grad():  # sharper logits than the default init, so greedy tokens vary
        for parameter in model.lm.parameters():
            parameter.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def clip():
    frames = sw.render(sw.scene_and_questions("val", 2)[0])[:6]
    return frames, np.arange(len(frames)) / 8.0


@pytest.mark.parametrize("spec", ["none", "random:ratio=0.5", "uniform:every=2"])
def test_three_questions_prefill_the_video_once_and_answer_as_without_reuse(model, clip, spec):
    tokens = model.encode_frames(*clip)
    model.counters.clear()
    video = model.prefill_video(tokens, spec)
    reused = [list(model.stream_reused(video, q, model.default_sampling(6))) for q in QUESTIONS]
    assert model.counters["video_prefills"] == 1 and model.counters["question_prefills"] == 3
    assert model.counters["full_prefills"] == 0
    fresh = [model.answer_tokens(tokens, q, spec, model.default_sampling(6)).token_ids for q in QUESTIONS]
    assert model.counters["full_prefills"] == 3
    assert reused == fresh
    assert len({tuple(answer) for answer in fresh}) > 1  # the questions really got different answers


def test_reused_question_logits_equal_a_full_prefill(model, clip):
    tokens = model.encode_frames(*clip)
    video = model.prefill_video(tokens, "none")
    for question in QUESTIONS:
        _, suffix = model._prompt_ids(question)
        reused = model.runner.forward(model.runner.embed(suffix),
                                      video.question_position + torch.arange(len(suffix)), video.state)
        video.state.truncate(video.video_slots)
        prompt = model.prepare(tokens, question, model_spec("none"))
        _, full = model.runner.prefill(prompt.embeds, prompt.positions)
        # one-shot and chunked prefill take different SDPA paths: equal up to float rounding
        torch.testing.assert_close(reused, full, atol=1e-4, rtol=1e-4)


def model_spec(text):
    from compressors import parse_spec

    return parse_spec(text)


def test_question_conditioned_compressors_refuse_kv_reuse(model, clip):
    from dataclasses import dataclass

    from compressors import register_compressor, unregister_compressor

    @register_compressor("test-question-aware")
    @dataclass
    class QuestionAware:
        stage = "pre_llm"
        trainable = False
        uses_question = True

        def compress(self, tokens, ctx):
            return tokens

    try:
        with pytest.raises(VidsieveError, match="question"):
            model.prefill_video(model.encode_frames(*clip), "test-question-aware")
    finally:
        unregister_compressor("test-question-aware")


def test_patch_reuse_on_a_static_clip_equals_full_recomputation_and_skips_most_patches(model):
    frames = np.repeat(sw.render(sw.scene_and_questions("val", 0)[0])[:1], 12, axis=0)
    reuse = PatchReuseEncoder(model.encoder, threshold=0.02, refresh_every=8)
    reused = reuse.encode(frames).tokens
    full = model.encoder.encode(frames).tokens
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)
    assert reuse.stats.full_frames == 2  # the first frame and one refresh
    assert reuse.stats.skipped_fraction == pytest.approx(10 / 12)


def test_patch_reuse_on_a_moving_clip_recomputes_changed_patches_and_stays_close(model):
    frames = sw.render(sw.scene_and_questions("val", 1)[0])
    reuse = PatchReuseEncoder(model.encoder, threshold=0.01, refresh_every=4)
    reused = reuse.encode(frames).tokens
    full = model.encoder.encode(frames).tokens
    assert 0.2 < reuse.stats.skipped_fraction < 1.0
    relative_error = float((reused - full).norm() / full.norm())
    assert relative_error < 0.1  # documented tolerance for a moving clip; refreshes bound the drift
    refreshed = [0, 4, 8, 12]  # full frames match up to float noise (one frame vs a batch through the conv stem)
    torch.testing.assert_close(reused[refreshed], full[refreshed], atol=1e-4, rtol=1e-4)


def test_patch_reuse_with_threshold_zero_changes_nothing_that_changed(model):
    frames = sw.render(sw.scene_and_questions("val", 1)[0])[:5]
    frames[3] = frames[2]  # one repeated frame: nothing to recompute there
    reuse = PatchReuseEncoder(model.encoder, threshold=0.0, refresh_every=100)
    reuse.encode(frames)
    assert reuse.stats.patches_recomputed < reuse.stats.patches


@pytest.mark.parametrize("text, expected", [
    ("none", ReuseSpec()), ("kv", ReuseSpec(kv=True)), ("patches", ReuseSpec(patches=True)),
    ("kv+patches:threshold=0.05,refresh=4", ReuseSpec(kv=True, patches=True, threshold=0.05, refresh_every=4)),
])
def test_reuse_specs_parse(text, expected):
    assert ReuseSpec.parse(text) == expected
    assert ReuseSpec.parse(str(expected)) == expected


@pytest.mark.parametrize("text, message", [
    ("cache", "unknown reuse"), ("patches:speed=2", "speed"), ("patches:threshold=x", "bad value"),
    ("patches:refresh=0", "refresh"),
])
def test_bad_reuse_specs_name_the_problem(text, message):
    with pytest.raises(ReuseSpecError, match=message):
        ReuseSpec.parse(text)


def test_patch_reuse_behind_a_motion_input_tower_matches_full_frames_and_a_still_clip():
    """A motion-input tower (the recipe's) also reads each frame's change: reused frames stay
    exact on a still clip, and full (refreshed) frames of a moving clip equal the clip's."""
    config = VLMConfig.from_name("vidsieve-tiny")
    config.vision["motion_input"] = True
    encoder = VLM.from_config(config, seed=2).encoder
    still = np.repeat(sw.render(sw.scene_and_questions("val", 0)[0])[:1], 6, axis=0)
    reuse = PatchReuseEncoder(encoder, threshold=0.02, refresh_every=8)
    # float32 sums over different batch shapes differ in their last bits (2e-5 on val clip 0)
    torch.testing.assert_close(reuse.encode(still).tokens, encoder.encode(still).tokens, atol=1e-4, rtol=1e-4)
    moving = sw.render(sw.scene_and_questions("val", 1)[0])[:9]
    reuse = PatchReuseEncoder(encoder, threshold=0.01, refresh_every=4)
    reused, full = reuse.encode(moving).tokens, encoder.encode(moving).tokens
    torch.testing.assert_close(reused[[0, 4, 8]], full[[0, 4, 8]], atol=1e-4, rtol=1e-4)
    assert float((reused - full).norm() / full.norm()) < 0.1 and reuse.stats.skipped_fraction > 0.1
    resumed = PatchReuseEncoder(encoder, threshold=0.01, refresh_every=4)  # a stream's frame before is given
    torch.testing.assert_close(resumed.encode(moving[4:6], previous=moving[3]).tokens[0], full[4], atol=1e-4, rtol=1e-4)
