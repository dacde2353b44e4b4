"""Live sessions and the engine, without a network: answers equal the offline pipeline's,
memory stays bounded, the engine is fair, admits a bounded number of jobs and releases them."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from compressors import SpecError
from streaming.engine import Engine, EngineConfig, EngineFullError
from streaming.session import (
    AnswerDelta,
    AnswerDone,
    ErrorEvent,
    FrameSampler,
    FrameTimestampError,
    MemoryPolicy,
    Question,
    Session,
    SessionConfig,
    SessionConfigError,
)
from streaming.video import SamplingPlan, plan_frame_indices
from tests.server_fixtures import clip, tiny_model

TOKENS_PER_FRAME = 16  # vidsieve-tiny: 128 px, 16 px patches, 2x2 merge
PREFIX = 1  # "<user>"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def video():
    return clip("test", 0)


def run_session(model, config, frames, timestamps_s, questions, max_new_tokens=8):
    """Push every frame, ask every question after them, step until idle; returns (session, events)."""
    events = []
    session = Session(model, config, events.append, session_id="test")
    for frame, timestamp_s in zip(frames, timestamps_s):
        session.push_frame(float(timestamp_s), lambda frame=frame: frame)
    for index, text in enumerate(questions):
        session.ask(Question(f"q{index}", text, model.default_sampling(max_new_tokens)))
    while session.runnable():
        session.step()
    return session, events


def done_events(events):
    return [event for event in events if isinstance(event, AnswerDone)]


def test_full_window_without_carriers_answers_exactly_as_the_offline_prefill_and_reuse(model, video):
    frames, timestamps_s, questions = video
    texts = [q.text for q in questions[:2]]
    config = SessionConfig(fps=None, memory=MemoryPolicy(carriers=0, window_frames=16))
    session, events = run_session(model, config, frames, timestamps_s, texts)
    tokens = model.encode_frames(frames, timestamps_s)
    prefilled = model.prefill_video(tokens, "none")
    for text, done in zip(texts, done_events(events)):
        offline = model.answer_tokens(tokens, text, "none", model.default_sampling(8))
        reused = model.tokenizer.decode(list(model.stream_reused(prefilled, text, model.default_sampling(8))),
                                        skip_special_tokens=True).strip()
        assert done.text == offline.text == reused
        assert done.usage.visual_tokens_kept == 16 * TOKENS_PER_FRAME
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta) and e.question_id == "q0") == done_events(events)[0].text


def test_carriers_without_window_answer_exactly_as_offline_videoscan(model, video):
    frames, timestamps_s, questions = video
    config = SessionConfig(fps=None, memory=MemoryPolicy(carriers=4, window_frames=0))
    _, events = run_session(model, config, frames, timestamps_s, [questions[0].text])
    offline = model.answer(frames, timestamps_s, questions[0].text, "videoscan:memory=4", model.default_sampling(8))
    [done] = done_events(events)
    assert done.text == offline.text and done.usage.visual_tokens_kept == offline.visual_after == 4


def test_videoscan_spec_is_the_carrier_memory_and_fps_resamples_by_timestamp(model, video):
    frames, timestamps_s, questions = video
    config = SessionConfig(fps=4.0, compressor="videoscan:memory=3", memory=MemoryPolicy(carriers=1, window_frames=0))
    session, events = run_session(model, config, frames, timestamps_s, [questions[1].text])
    assert session.config.memory.carriers == 3 and session.frames_seen == 8 and session.frames_received == 16
    offline = model.answer(frames[::2], timestamps_s[::2], questions[1].text, "videoscan:memory=3",
                           model.default_sampling(8))
    assert done_events(events)[0].text == offline.text


def test_a_mid_stream_question_reads_only_earlier_frames_and_the_video_is_never_prefilled_again(model, video):
    frames, timestamps_s, questions = video
    events = []
    session = Session(model, SessionConfig(fps=None, memory=MemoryPolicy(0, 16)), events.append, session_id="s")
    model.counters.clear()
    for index, (frame, timestamp_s) in enumerate(zip(frames, timestamps_s)):
        session.push_frame(float(timestamp_s), lambda frame=frame: frame)
        if index in (5, 15):
            session.ask(Question(f"after-{index}", questions[0].text, model.default_sampling(8)))
    while session.runnable():
        session.step()
    assert model.counters["question_prefills"] == 2
    assert model.counters["video_prefills"] == 0 and model.counters["full_prefills"] == 0
    first, last = done_events(events)
    assert first.usage.frames_seen == 6 and last.usage.frames_seen == 16
    assert first.text == model.answer(frames[:6], timestamps_s[:6], questions[0].text, "none",
                                      model.default_sampling(8)).text


def test_default_policy_keeps_carriers_at_true_positions_and_every_token_of_the_recent_frames(model, video):
    frames, timestamps_s, _ = video
    config = SessionConfig(fps=None, memory=MemoryPolicy(carriers=64, window_frames=4))
    session, _ = run_session(model, config, frames, timestamps_s, [])
    state = session.state
    visual_positions = state.positions[state.is_visual][:, 0].tolist()
    span = TOKENS_PER_FRAME + 1  # a frame's tokens and its carrier
    carriers = [PREFIX + t * span + TOKENS_PER_FRAME for t in range(12)]
    window = [PREFIX + t * span + i for t in range(12, 16) for i in range(span)]
    assert visual_positions == carriers + window
    assert state.frame_index[state.is_visual].tolist() == list(range(12)) + [t for t in range(12, 16) for _ in range(span)]
    assert state.next_position == PREFIX + 16 * span


@pytest.mark.slow
def test_memory_stays_bounded_over_hundreds_of_frames(model, video):
    frames, _, questions = video
    config = SessionConfig(fps=None, memory=MemoryPolicy(carriers=8, window_frames=2))
    session = Session(model, config, lambda event: None, session_id="long")
    lengths, capacities = [], []
    for index in range(160):
        session.push_frame(index / 8.0, lambda index=index: frames[index % 16])
        session.step()
        lengths.append(session.state.length)
        capacities.append(session.state.capacity)
    bound = PREFIX + 8 + 2 * (TOKENS_PER_FRAME + 1)
    assert max(lengths) <= bound  # (a window frame's carrier may already have left the carrier memory)
    assert set(capacities[20:]) == {capacities[-1]}
    assert int(session.state.is_visual.sum()) <= 8 + 2 * (TOKENS_PER_FRAME + 1)
    session.ask(Question("late", questions[0].text, model.default_sampling(4)))
    while session.runnable():
        session.step()
    assert session.state.length == lengths[-1]  # the question's tokens were truncated away


@pytest.mark.parametrize("fps", [0.7, 2.0, 8.0, 30.0])
def test_frame_sampler_keeps_the_frames_a_file_sampling_plan_would(fps):
    rng = np.random.default_rng(int(fps * 10))
    timestamps_s = np.cumsum(rng.uniform(0.01, 0.3, size=200)).tolist()
    sampler = FrameSampler(fps)
    kept = [index for index, t in enumerate(timestamps_s) if sampler.advance(t)]
    assert kept == plan_frame_indices(timestamps_s, SamplingPlan(fps=fps))
    with pytest.raises(FrameTimestampError):
        sampler.advance(timestamps_s[-1])  # not after the previous frame
    with pytest.raises(FrameTimestampError):
        sampler.wants(float("nan"))


def test_compressors_that_read_the_question_or_act_in_the_lm_are_refused_for_live_sessions(model):
    for spec in ("quecc", "fastv", "corematching"):
        with pytest.raises(SessionConfigError, match="question"):
            Session(model, SessionConfig(compressor=spec), lambda event: None, session_id="x")
    with pytest.raises(SpecError):
        Session(model, SessionConfig(compressor="no-such-compressor"), lambda event: None, session_id="x")
    with pytest.raises(SessionConfigError):
        MemoryPolicy(carriers=0, window_frames=0)


def test_a_per_frame_compressor_keeps_fewer_tokens_at_their_original_positions(model, video):
    frames, timestamps_s, questions = video
    config = SessionConfig(compressor="random:ratio=0.25", fps=None, memory=MemoryPolicy(carriers=0, window_frames=16))
    session, events = run_session(model, config, frames[:4], timestamps_s[:4], [questions[0].text])
    positions = session.state.positions[session.state.is_visual][:, 0]
    assert len(positions) == 4 * 4 and bool((positions < PREFIX + 4 * TOKENS_PER_FRAME).all())
    assert done_events(events)[0].usage.visual_tokens_seen == 4 * TOKENS_PER_FRAME


def test_cancel_ends_the_answer_with_cancelled_and_restores_the_video_kv(model, video):
    frames, timestamps_s, questions = video
    events = []
    session = Session(model, SessionConfig(fps=None), events.append, session_id="c")
    for frame, timestamp_s in zip(frames[:3], timestamps_s[:3]):
        session.push_frame(float(timestamp_s), lambda frame=frame: frame)
    session.ask(Question("long", questions[0].text, model.default_sampling(40)))
    session.ask(Question("queued", questions[1].text, model.default_sampling(40)))
    while not any(isinstance(e, AnswerDelta) for e in events):
        session.step()
    video_slots = session.state.length - 8  # 8 question tokens are in the KV while answering
    assert session.cancel("long") and session.cancel("queued") and not session.cancel("unknown")
    while session.runnable():
        session.step()
    finished = {e.question_id: e.finish_reason for e in done_events(events)}
    assert finished == {"long": "cancelled", "queued": "cancelled"}
    assert session.state.length <= video_slots + 1


def test_a_question_before_any_frame_is_answered_from_the_text_alone(model):
    _, events = run_session(model, SessionConfig(), [], [], ["What colour is the circle?"])
    [done] = done_events(events)
    assert done.usage.visual_tokens_kept == 0 and done.usage.completion_tokens >= 1


def test_patch_reuse_sessions_skip_unchanged_patches(model, video):
    frames, timestamps_s, questions = video
    still = np.repeat(frames[:1], 6, axis=0)
    config = SessionConfig(fps=None, reuse="patches:threshold=0.02,refresh=8")
    session, events = run_session(model, config, still, timestamps_s[:6], [questions[0].text])
    assert session._encoder.stats.skipped_fraction > 0.5
    assert done_events(events)


# --- the engine ---------------------------------------------------------------------------------


class RecordingSession(Session):
    order: list

    def step(self):
        self.order.append(self.session_id)
        super().step()


def wait_for(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_the_engine_serves_sessions_round_robin_one_work_item_each(model, video):
    frames, timestamps_s, questions = video
    engine = Engine(model, EngineConfig(max_sessions=4))
    order, events = [], {"a": [], "b": []}
    for name in ("a", "b"):
        session = RecordingSession(model, SessionConfig(fps=None), events[name].append, session_id=name)
        session.order = order
        for frame, timestamp_s in zip(frames[:4], timestamps_s[:4]):
            session.push_frame(float(timestamp_s), lambda frame=frame: frame)
        session.ask(Question("q", questions[0].text, model.default_sampling(6)))
        engine.admit(session)
    engine.start()
    try:
        wait_for(lambda: all(done_events(e) for e in events.values()))
    finally:
        engine.shutdown()
    both_busy = order[: 2 * min(order.count("a"), order.count("b"))]
    assert both_busy == ["a", "b"] * (len(both_busy) // 2)
    assert done_events(events["a"])[0].text == done_events(events["b"])[0].text  # same frames, same answer


@pytest.mark.parametrize("max_decode_batch", [16, 1])
def test_concurrent_answers_decode_as_one_batch_and_answer_as_they_would_alone(model, video, max_decode_batch):
    frames, timestamps_s, questions = video
    texts = [q.text for q in questions[:4]]
    config = SessionConfig(fps=None, memory=MemoryPolicy(carriers=4, window_frames=2))
    alone = [done_events(run_session(model, config, frames[: 3 + i], timestamps_s[: 3 + i], [text])[1])[0].text
             for i, text in enumerate(texts)]  # sessions of different lengths
    engine = Engine(model, EngineConfig(max_sessions=4, max_decode_batch=max_decode_batch))
    events = [[] for _ in texts]
    for i, text in enumerate(texts):
        session = Session(model, config, events[i].append, session_id=f"s{i}")
        for frame, timestamp_s in zip(frames[: 3 + i], timestamps_s[: 3 + i]):
            session.push_frame(float(timestamp_s), lambda frame=frame: frame)
        session.ask(Question("q", text, model.default_sampling(8)))
        engine.admit(session)
    before = engine.stats()
    engine.start()
    try:
        wait_for(lambda: all(done_events(e) for e in events))
    finally:
        engine.shutdown()
    assert [done_events(e)[0].text for e in events] == alone
    after = engine.stats()
    steps, passes = after.decode_steps - before.decode_steps, after.decode_passes - before.decode_passes
    assert steps == sum(done_events(e)[0].usage.completion_tokens - 1 for e in events)  # one per token after the first
    if max_decode_batch == 1:
        assert passes == steps
    else:
        assert steps > 0 and passes < steps  # several sessions' steps shared a pass


def test_admission_control_refuses_sessions_beyond_the_limit_and_close_releases_memory(model, video):
    frames, timestamps_s, questions = video
    engine = Engine(model, EngineConfig(max_sessions=2)).start()
    try:
        events = []
        first = engine.admit(Session(model, SessionConfig(fps=None), events.append, session_id="1"))
        engine.admit(Session(model, SessionConfig(), events.append, session_id="2"))
        with pytest.raises(EngineFullError):
            engine.admit(Session(model, SessionConfig(), events.append, session_id="3"))
        first.push_frame(0.0, lambda: frames[0])
        first.ask(Question("q", questions[0].text, model.default_sampling(4)))
        engine.notify()
        wait_for(lambda: done_events(events))
        kv = weakref.ref(first.state)
        assert engine.stats().kv_bytes > 0
        engine.close(first)
        wait_for(lambda: engine.stats().sessions == 1)
        del first
        gc.collect()
        assert kv() is None and engine.stats().kv_bytes == 0
        engine.admit(Session(model, SessionConfig(), events.append, session_id="4"))  # the slot is free again
    finally:
        engine.shutdown()


def test_a_client_that_cannot_take_events_pauses_only_its_own_answer(model, video):
    frames, timestamps_s, questions = video
    engine = Engine(model, EngineConfig(max_sessions=4))
    room = threading.Event()
    slow_events, fast_events = [], []
    slow = Session(model, SessionConfig(fps=None), slow_events.append, session_id="slow", can_emit=room.is_set)
    fast = Session(model, SessionConfig(fps=None), fast_events.append, session_id="fast")
    for session in (slow, fast):
        session.push_frame(0.0, lambda: frames[0])
        session.ask(Question("q", questions[0].text, model.default_sampling(6)))
        engine.admit(session)
    engine.start()
    try:
        wait_for(lambda: done_events(fast_events))
        time.sleep(0.2)
        assert slow_events == [] and slow.frames_seen == 1  # its frame went in, its answer waits
        room.set()
        engine.notify()
        wait_for(lambda: done_events(slow_events))
    finally:
        engine.shutdown()


def test_a_job_that_crashes_is_closed_with_an_internal_error_and_the_engine_serves_the_rest(model, video):
    frames, timestamps_s, questions = video

    class Broken(Session):
        def _ingest(self, frame):
            raise RuntimeError("boom")

    engine = Engine(model, EngineConfig(max_sessions=4))
    broken_events, good_events = [], []
    broken = Broken(model, SessionConfig(fps=None), broken_events.append, session_id="broken")
    good = Session(model, SessionConfig(fps=None), good_events.append, session_id="good")
    for session in (broken, good):
        session.push_frame(0.0, lambda: frames[0])
        session.ask(Question("q", questions[0].text, model.default_sampling(4)))
        engine.admit(session)
    engine.start()
    try:
        wait_for(lambda: done_events(good_events) and broken_events)
        wait_for(lambda: engine.stats().sessions == 1)
    finally:
        engine.shutdown()
    assert isinstance(broken_events[0], ErrorEvent) and broken_events[0].code == "internal" and broken_events[0].fatal


def test_a_stream_encodes_each_frame_with_the_frame_before_as_a_clip_would(video):
    """The recipe's tower reads each frame's change from the one before: pushed one at a
    time, frames must give the tokens they give inside the whole clip (not those of a still frame)."""
    from vlm.model import VLM, VLMConfig

    config = VLMConfig.from_name("vidsieve-tiny")
    config.vision["motion_input"] = True  # the tower `vidsieve train tiny` builds
    model = VLM.from_config(config)
    frames, timestamps_s, _ = video
    seen = []
    project = model.projector.forward

    def recording(features, frame_index=None):
        seen.append(features.clone())
        return project(features, frame_index)

    model.projector.forward = recording
    try:
        run_session(model, SessionConfig(fps=None, memory=MemoryPolicy(carriers=0, window_frames=16)),
                    frames[:5], timestamps_s[:5], [])
    finally:
        del model.projector.forward
    clip_features = model.encoder.encode(frames[:5]).tokens
    torch.testing.assert_close(torch.cat(seen), clip_features, atol=1e-4, rtol=1e-4)
    still = model.encoder.encode(frames[3:4]).tokens  # frame 3 with no frame before it
    assert (still - clip_features[3]).abs().max() > 1e-3
