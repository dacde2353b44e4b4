"""The Gradio demo, driven in-process through gradio_client as a visitor's browser would."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo extra is not installed (pip install vidsieve[demo])")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed (pip install vidsieve[dev])")

from compressors import list_compressors, parse_spec  # noqa: E402
from server.demo import Demo, DemoInputError, bundled_examples, kept_tokens, read_clip  # noqa: E402
from streaming import open_video  # noqa: E402
from streaming.session import SessionConfigError  # noqa: E402
from vlm.model import EMBEDDED_WEIGHTS, VLM  # noqa: E402

TRAINED_WEIGHTS = EMBEDDED_WEIGHTS / "vidsieve-tiny" / "model.safetensors"
EXAMPLE = bundled_examples()[0]


@pytest.fixture(scope="module")
def client(demo_url):
    return gradio_client.Client(demo_url, verbose=False)


@pytest.fixture(scope="module")
def model():
    return VLM.from_pretrained("vidsieve-tiny")


def offline_answer(model, video: Path, question: str, spec: str) -> str:
    frames = open_video(video, num_frames=model.config.num_frames).read_all()
    return model.answer(np.stack([f.rgb for f in frames]), [f.timestamp_s for f in frames], question, spec).text


def ask(client, video, question, compressor="todre", budget="ratio=0.25"):
    return client.predict(gradio_client.handle_file(str(video)), question, "vidsieve-tiny", "dense", compressor, budget,
                          api_name="/ask")


def test_client_gets_the_same_answer_as_offline_vlm_answer_with_overlay_and_counts(client, model):
    answer, overlay, stats, status = ask(client, EXAMPLE.video, EXAMPLE.question)
    assert answer == offline_answer(model, EXAMPLE.video, EXAMPLE.question, "todre:ratio=0.25")
    assert status.startswith("Done."), status
    assert Path(overlay).is_file()
    assert "256 -> 256" in stats and "256 -> 64" in stats and "ms" in stats


@pytest.mark.skipif(not TRAINED_WEIGHTS.is_file(),
                    reason=f"the trained vidsieve-tiny is not shipped yet ({TRAINED_WEIGHTS} is missing)")
def test_trained_default_model_gives_the_manifests_correct_answer(client):
    answer, _, _, status = ask(client, EXAMPLE.video, EXAMPLE.question, "none", "keep all")
    assert answer == EXAMPLE.answer, status


def test_side_by_side_answers_equal_each_compressors_offline_answer(client, model, talkative_example):
    example = talkative_example  # VideoScan makes the model say words here, so real text is compared
    answer_a, overlay_a, answer_b, overlay_b, stats, status = client.predict(
        gradio_client.handle_file(str(example.video)), example.question, "vidsieve-tiny", "dense", "videoscan", "fastv",
        "per_frame=2", api_name="/compare")
    assert status.startswith("Done."), status
    assert answer_a == offline_answer(model, example.video, example.question, "videoscan:per_frame=2")
    assert answer_b == offline_answer(model, example.video, example.question, "fastv:per_frame=2")
    assert answer_a, "the comparison above must compare real text"
    assert Path(overlay_a).is_file() and Path(overlay_b).is_file()
    assert "256 -> 16" in stats and "256 -> 32" in stats


def test_unknown_compressor_spec_comes_back_as_a_message(client):
    *_, status = ask(client, EXAMPLE.video, EXAMPLE.question, "no-such-method")
    assert status.startswith("Error:") and "Unknown compressor 'no-such-method'" in status


def test_unreadable_video_comes_back_as_a_message(client, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    *_, status = ask(client, bad, EXAMPLE.question)
    assert status.startswith("Error:") and "broken" in status


def test_missing_question_comes_back_as_a_message(client):
    *_, status = ask(client, EXAMPLE.video, "   ")
    assert status == "Error: Type a question about the video first."


def test_live_clip_pushed_frame_by_frame_is_answered_with_bounded_kv(client):
    _, stream = client.predict(EXAMPLE.video.name, "vidsieve-tiny", "dense", "none", api_name="/live_example")
    assert "frames pushed 16" in stream, stream
    answer, stream = client.predict(EXAMPLE.question, api_name="/live_ask")
    assert "encoded 16" in stream, stream
    # 64 carriers at most + every token of the 4 latest frames (16 each): 16 carriers + 64 here
    assert "in the KV now 80" in stream, stream


def test_kept_tokens_count_what_every_compressor_leaves_for_decoding(model):
    clip = read_clip(model, str(EXAMPLE.video))
    for info in list_compressors():
        spec = parse_spec(f"{info.name}:ratio=0.25")
        timings: dict = {}
        list(model.stream_tokens(clip.tokens, EXAMPLE.question, spec, model.default_sampling(1), timings))
        assert kept_tokens(model, clip.tokens, EXAMPLE.question, spec).count == timings["visual_after"], info.name


def test_demo_handlers_refuse_a_missing_video_with_a_sentence():
    with pytest.raises(DemoInputError, match="Upload a video or pick one of the bundled examples first"):
        next(Demo().ask(None, "What colour is the circle?", "vidsieve-tiny", "dense", "none", "keep all"))


def test_live_feed_takes_webcam_frames_of_any_size_and_refuses_question_aware_compressors():
    demo = Demo()
    try:
        feed = demo.live_feed(None, "vidsieve-tiny", "dense", "none")
        rng = np.random.default_rng(0)
        for _ in range(3):
            feed.push(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8))
        answer, done = list(feed.ask("What colour is the circle?"))[-1]
        assert done is not None and done.usage.frames_seen == 3 and answer == done.text
        assert demo.live_feed(feed, "vidsieve-tiny", "dense", "none") is feed
        with pytest.raises(SessionConfigError, match="cannot compress a live stream"):
            demo.live_feed(feed, "vidsieve-tiny", "dense", "todre:ratio=0.5")
        assert not feed.session.closed  # a refused change leaves the running stream alone
    finally:
        demo.close()


def test_demo_without_gradio_names_the_extra_to_install(monkeypatch):
    from eval.demo_screenshot import free_port
    from kernels.errors import VidsieveError
    from server.cli import main
    from server.demo import build_demo

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    with pytest.raises(VidsieveError, match=r"pip install vidsieve\[demo\]"):
        build_demo()
    assert main(["demo", "--port", str(free_port())]) == 2
