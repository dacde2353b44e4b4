"""The servers end to end: a real uvicorn on 127.0.0.1, a `websockets` client and the official
`openai` client. Answers equal the same model's offline answers; every limit and every bad
input gets a clear error; the server keeps serving and releases each session's memory."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import websockets

from eval import shapesworld as sw
from server.schemas import FRAME_HEADER, FRAME_MAGIC, server_event
from streaming.media import read_video_bytes
from streaming.video import SamplingPlan
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    API_KEY,
    TRAINED_WEIGHTS,
    answer,
    auth_headers,
    clip,
    connect,
    expect_error,
    frame_message,
    image_bytes,
    model_folder,
    offline_model,
    overridden_settings,
    receive,
    running_server,
    send_json,
    server,
    server_settings,
    start_session,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def video():
    return clip("test", 0)


@pytest.fixture(scope="module")
def mp4_bytes(video, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    sw.write_mp4(video[0], path, fps=8)
    return path.read_bytes()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(question: str, url: str, kind: str = "video_url", **extra) -> dict:
    return {"model": "vidsieve-tiny", "max_tokens": 8, **extra,
            "messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                      {"type": kind, kind: {"url": url}}]}]}


def post_chat(server, body, key=API_KEY, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.http_url}/v1/chat/completions", json=body, headers=auth_headers(key), timeout=60,
                      **kwargs)


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


# --- answers -----------------------------------------------------------------------------------


def test_a_websocket_client_streams_a_clip_and_gets_answers_mid_stream_and_at_the_end(server, video, offline_model):
    frames, timestamps_s, questions = video
    question = questions[0].text

    async def run():
        async with await connect(server) as ws:
            started = await start_session(ws, fps=4.0, memory={"carriers": 0, "window_frames": 16})
            assert started["memory"] == {"carriers": 0, "window_frames": 16} and started["limits"]["max_new_tokens"] == 48
            results = []
            for index, (frame, timestamp_s) in enumerate(zip(frames, timestamps_s)):
                await ws.send(frame_message(frame, timestamp_s))
                if index in (7, 15):
                    await send_json(ws, type="question", id=f"after-{index}", text=question, max_new_tokens=8)
                    results.append(await answer(ws, f"after-{index}"))
            return results

    (mid_deltas, mid), (end_deltas, end) = asyncio.run(run())
    server_event.validate_python(end)
    sampling = offline_model.default_sampling(8)
    # fps 4 of an 8 fps clip keeps every other frame
    assert mid["text"] == offline_model.answer(frames[0:8:2], timestamps_s[0:8:2], question, "none", sampling).text
    assert end["text"] == offline_model.answer(frames[::2], timestamps_s[::2], question, "none", sampling).text
    assert "".join(mid_deltas) == mid["text"] and "".join(end_deltas) == end["text"] and end_deltas
    assert mid["usage"]["frames_seen"] == 4 and end["usage"]["visual_tokens_kept"] == 8 * 16
    assert end["usage"]["time_to_first_token_s"] > 0 and end["usage"]["prompt_tokens"] > 0
    server.wait_released()


def test_the_default_memory_policy_streams_jpeg_frames_and_reports_what_it_kept(server, video):
    frames, timestamps_s, questions = video

    async def run():
        async with await connect(server) as ws:
            started = await start_session(ws, fps=None, compressor="avgpool")
            for frame, timestamp_s in zip(frames, timestamps_s):
                await ws.send(frame_message(frame, timestamp_s, "JPEG"))
            await send_json(ws, type="question", text=questions[1].text, max_new_tokens=4)
            return started, await answer(ws, "q1")

    started, (_, done) = asyncio.run(run())
    memory = started["memory"]
    assert started["compressor"].startswith("avgpool")
    assert done["usage"]["frames_seen"] == 16 and done["usage"]["visual_tokens_seen"] == 16 * 16
    assert 0 < done["usage"]["visual_tokens_kept"] <= memory["carriers"] + memory["window_frames"] * (4 + 1)


def test_the_openai_client_answers_about_a_video_data_url_with_and_without_streaming(server, video, mp4_bytes,
                                                                                      offline_model):
    question = video[2][0].text
    client = openai_client(server)
    url = data_url(mp4_bytes, "video/mp4")
    messages = [{"role": "user", "content": [{"type": "text", "text": question},
                                             {"type": "video_url", "video_url": {"url": url}}]}]
    plain = client.chat.completions.create(model="vidsieve-tiny", messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model="vidsieve-tiny", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    frames, timestamps_s = read_video_bytes(mp4_bytes, SamplingPlan(num_frames=16), max_side_px=512, timeout_s=30)
    offline = offline_model.answer(frames, timestamps_s, question, "none", offline_model.default_sampling(8))
    assert plain.choices[0].message.content == streamed == offline.text
    assert plain.choices[0].finish_reason == offline.finish_reason
    assert plain.usage.completion_tokens == len(offline.token_ids)
    assert chunks[-1].usage.model_extra["visual_tokens_kept"] == 256
    compressed = client.chat.completions.create(model="vidsieve-tiny", messages=messages, max_tokens=8,
                                                extra_body={"compressor": "random:ratio=0.25"})
    assert compressed.usage.model_extra["visual_tokens_kept"] == 64
    assert compressed.choices[0].message.content == offline_model.answer(
        frames, timestamps_s, question, "random:ratio=0.25", offline_model.default_sampling(8)).text
    server.wait_released()


def test_images_sent_as_data_urls_are_the_frames_of_the_question(server, video, offline_model):
    frames, _, questions = video
    content = [{"type": "text", "text": questions[0].text}] + [
        {"type": "image_url", "image_url": {"url": data_url(image_bytes(frame), "image/png")}} for frame in frames[:3]]
    reply = openai_client(server).chat.completions.create(
        model="vidsieve-tiny", messages=[{"role": "user", "content": content}], max_tokens=6)
    offline = offline_model.answer(frames[:3], np.arange(3.0), questions[0].text, "none", offline_model.default_sampling(6))
    assert reply.choices[0].message.content == offline.text


# --- health, readiness, metrics, auth ------------------------------------------------------------


def test_health_ready_models_and_metrics(server):
    assert httpx.get(f"{server.http_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.http_url}/ready", headers=auth_headers()).json()["status"] == "ready"
    models = httpx.get(f"{server.http_url}/v1/models", headers=auth_headers()).json()
    assert [card["id"] for card in models["data"]] == ["vidsieve-tiny"]
    metrics = httpx.get(f"{server.http_url}/metrics", headers=auth_headers()).text
    # (the labelled histograms list their buckets once an answer was observed: here, their type line)
    for name in ("vidsieve_sessions", "vidsieve_queue_depth", "vidsieve_time_to_first_token_seconds histogram",
                 "vidsieve_visual_tokens_kept histogram", "vidsieve_kv_bytes", "vidsieve_decode_steps",
                 "vidsieve_decode_passes"):
        assert name in metrics
    assert httpx.get(f"{server.http_url}/health", headers={"x-request-id": "trace-me"}).headers["x-request-id"] == "trace-me"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_every_route_but_health_needs_the_api_key(server, key):
    headers = {} if key is None else auth_headers(key)
    for method, path in [("GET", "/v1/models"), ("GET", "/ready"), ("GET", "/metrics"),
                         ("POST", "/v1/chat/completions")]:
        response = httpx.request(method, f"{server.http_url}{path}", headers=headers, json={})
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized", path
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.http_url}/health").status_code == 200

    async def handshake():
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url, additional_headers=headers)
        return refused.value.response.status_code

    assert asyncio.run(handshake()) == 401
    assert httpx.get(f"{server.http_url}/v1/models", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401


# --- limits and bad input on the WebSocket ---------------------------------------------------------


def noise_png(side: int) -> np.ndarray:
    return np.random.default_rng(side).integers(0, 256, size=(side, side, 3), dtype=np.uint8)


def test_every_websocket_limit_gives_an_error_event_and_the_session_still_answers(server, video):
    frames, timestamps_s, questions = video

    async def run():
        async with await connect(server) as ws:
            await send_json(ws, type="question", text="too early")
            await expect_error(ws, "not_started")
            await ws.send(frame_message(frames[0], 0.0))
            await expect_error(ws, "not_started")
            await start_session(ws, fps=None)
            await start_session_again(ws)
            await ws.send(frame_message(noise_png(300), 0.0))  # ~270 kB PNG > 200 kB
            await expect_error(ws, "frame_too_large")
            await ws.send(frame_message(np.zeros((600, 600, 3), np.uint8), 0.0))  # small file, too many pixels
            await expect_error(ws, "bad_frame")
            await ws.send(frame_message(frames[0], 4000.0))  # past max_session_s = 3600
            await expect_error(ws, "session_too_long")
            await ws.send(frame_message(frames[0], 1.0))
            await ws.send(frame_message(frames[1], 0.5))  # goes back in time
            await expect_error(ws, "bad_timestamp")
            await send_json(ws, type="question", text="x" * 201)
            await expect_error(ws, "question_too_long")
            await send_json(ws, type="question", text="what?", max_new_tokens=49)
            await expect_error(ws, "too_many_tokens")
            await send_json(ws, type="cancel", id="nothing")
            await expect_error(ws, "unknown_question")
            await send_json(ws, type="ping", id="p1")
            assert await receive(ws) == {"type": "pong", "id": "p1"}
            await send_json(ws, type="question", id="ok", text=questions[0].text, max_new_tokens=4)
            _, done = await answer(ws, "ok")
            return done

    async def start_session_again(ws):
        await send_json(ws, type="session.start")
        await expect_error(ws, "already_started")

    assert asyncio.run(run())["usage"]["frames_seen"] == 1
    server.wait_released()


def test_frames_over_the_rate_limit_are_dropped_with_an_error(server, video):
    frames = video[0]

    async def run():
        async with await connect(server) as ws:
            await start_session(ws, fps=None)
            for index in range(12):
                await ws.send(frame_message(frames[index], index / 8.0))
            await send_json(ws, type="ping")
            codes = []
            while (event := await receive(ws))["type"] != "pong":
                codes.append(event["code"])
            return codes

    with overridden_settings(server, max_frames_per_s=2.0):  # a burst of 2, then 2 a second
        codes = asyncio.run(run())
    assert set(codes) == {"rate_limited"} and len(codes) >= 5


def test_a_websocket_message_over_the_size_limit_closes_the_connection_with_1009(server):
    async def run():
        async with await connect(server) as ws:
            await start_session(ws)
            await ws.send(FRAME_HEADER.pack(FRAME_MAGIC, 0.0) + bytes(500_000))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await receive(ws)
            return closed.value.rcvd.code

    assert asyncio.run(run()) == 1009
    server.wait_released()


def test_corrupt_frames_get_bad_frame_and_the_next_good_frame_is_taken(server, video):
    frames, _, questions = video
    png = image_bytes(frames[0])

    async def run():
        async with await connect(server) as ws:
            await start_session(ws, fps=None)
            for payload in (FRAME_HEADER.pack(FRAME_MAGIC, 0.0) + b"not an image",
                            FRAME_HEADER.pack(FRAME_MAGIC, 0.1) + png[: len(png) // 2],
                            b"JPEG" + png, b"\x00\x01"):
                await ws.send(payload)
                await expect_error(ws, "bad_frame")
            await ws.send(frame_message(frames[1], 0.2))
            await send_json(ws, type="question", text=questions[0].text, max_new_tokens=3)
            return await answer(ws, "q1")

    assert asyncio.run(run())[1]["usage"]["frames_seen"] == 1


def test_unknown_compressors_and_question_aware_ones_are_refused_for_a_session(server):
    async def run():
        async with await connect(server) as ws:
            await send_json(ws, type="session.start", compressor="no-such-method")
            unknown = await expect_error(ws, "bad_spec")
            await send_json(ws, type="session.start", compressor="fastv")
            await expect_error(ws, "bad_config")
            await send_json(ws, type="session.start", attention="sparse-magic")
            await expect_error(ws, "bad_spec")
            await send_json(ws, type="session.start", model="gpt-5")
            await expect_error(ws, "unknown_model")
            await send_json(ws, type="session.start", memory={"carriers": 5000})
            await expect_error(ws, "bad_config")
            await start_session(ws)  # the connection is still good
            return unknown

    assert "no-such-method" in asyncio.run(run())["message"]
    response = post_chat(server, chat_body("what?", "data:video/mp4;base64,AAAA", compressor="no-such-method"))
    assert response.status_code == 422 and response.json()["error"]["code"] == "bad_spec"


def test_a_full_server_refuses_more_sessions_with_an_error_and_429_then_recovers(server, video, mp4_bytes):
    async def run():
        held = [await connect(server) for _ in range(server.settings.max_sessions)]
        for ws in held:
            await start_session(ws)
        extra = await connect(server)
        await send_json(extra, type="session.start")
        error = await expect_error(extra, "server_full")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await receive(extra)
        response = await asyncio.to_thread(post_chat, server, chat_body("what?", data_url(mp4_bytes, "video/mp4")))
        for ws in held:
            await ws.close()
        return error, closed.value.rcvd.code, response

    error, close_code, response = asyncio.run(run())
    assert error["fatal"] and close_code == 1013
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    server.wait_released()
    assert post_chat(server, chat_body(video[2][0].text, data_url(mp4_bytes, "video/mp4"))).status_code == 200


def test_an_idle_websocket_is_closed_with_an_error(server):
    async def run():
        async with await connect(server) as ws:
            await start_session(ws)
            error = await expect_error(ws, "idle_timeout")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await receive(ws)
            return error, closed.value.rcvd.code

    with overridden_settings(server, idle_timeout_s=0.5):
        error, code = asyncio.run(run())
    assert error["fatal"] and code == 1001
    server.wait_released()


def test_cancel_stops_an_answer_with_finish_reason_cancelled(server, video):
    frames, timestamps_s, questions = video

    async def run():
        async with await connect(server) as ws:
            await start_session(ws, fps=None)
            await ws.send(frame_message(frames[0], 0.0))
            await send_json(ws, type="question", id="long", text=questions[0].text, max_new_tokens=48)
            event = await receive(ws)
            assert event["type"] == "answer.delta"
            await send_json(ws, type="cancel", id="long")
            while event["type"] != "answer.done":
                event = await receive(ws)
            await send_json(ws, type="question", id="next", text=questions[0].text, max_new_tokens=3)
            return event, await answer(ws, "next")

    cancelled, (_, following) = asyncio.run(run())
    assert cancelled["finish_reason"] == "cancelled" and cancelled["usage"]["completion_tokens"] < 48
    assert following["finish_reason"] in ("stop", "length")


# --- clients that leave -------------------------------------------------------------------------


def test_a_websocket_client_that_disconnects_mid_answer_frees_its_session(server, video):
    frames, _, questions = video

    async def leave_mid_answer():
        ws = await connect(server)
        await start_session(ws, fps=None)
        for index in range(4):
            await ws.send(frame_message(frames[index], index / 8.0))
        await send_json(ws, type="question", text=questions[0].text, max_new_tokens=48)
        assert (await receive(ws))["type"] == "answer.delta"
        await ws.close()

    asyncio.run(leave_mid_answer())
    server.wait_released()

    async def next_client():
        async with await connect(server) as ws:
            await start_session(ws)
            await send_json(ws, type="question", text=questions[1].text, max_new_tokens=3)
            return await answer(ws, "q1")

    assert asyncio.run(next_client())[1]["type"] == "answer.done"


def test_an_sse_client_that_disconnects_mid_answer_frees_its_job(server, video, mp4_bytes):
    body = chat_body(video[2][0].text, data_url(mp4_bytes, "video/mp4"), stream=True, max_tokens=48)
    with httpx.stream("POST", f"{server.http_url}/v1/chat/completions", json=body, headers=auth_headers(),
                      timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                break  # one real delta, then hang up
    server.wait_released()
    assert post_chat(server, chat_body(video[2][0].text, data_url(mp4_bytes, "video/mp4"))).status_code == 200


# --- bad input over HTTP --------------------------------------------------------------------------


def test_bad_http_requests_get_4xx_with_a_reason(server, video, mp4_bytes):
    url = data_url(mp4_bytes, "video/mp4")
    question = video[2][0].text
    cases = [
        (dict(content=b"{not json"), 400, "invalid_json"),
        (dict(json={"model": "vidsieve-tiny"}), 422, "bad_request"),
        (dict(json=chat_body(question, url) | {"model": "gpt-5"}), 404, "unknown_model"),
        (dict(json={"model": "vidsieve-tiny", "messages": [{"role": "user", "content": question}]}), 422, "bad_media"),
        (dict(json={"model": "vidsieve-tiny", "messages": [{"role": "system", "content": "hi"}]}), 422, "bad_request"),
        (dict(json=chat_body("", url)), 422, "bad_request"),
        (dict(json=chat_body("x" * 201, url)), 422, "question_too_long"),
        (dict(json=chat_body(question, url, max_tokens=49)), 422, "too_many_tokens"),
        (dict(json=chat_body(question, "data:video/mp4;base64,!!!!")), 422, "bad_media"),
        (dict(json=chat_body(question, data_url(b"not a video at all", "video/mp4"))), 422, "bad_media"),
        (dict(json=chat_body(question, data_url(b"\x89PNG broken", "image/png"), "image_url")), 422, "bad_media"),
        (dict(json=chat_body(question, "data:video/mp4,plain")), 422, "bad_media"),
        (dict(json=chat_body(question, url, num_frames=4, fps=2.0)), 422, "bad_media"),
        (dict(json=chat_body(question, "ftp://example.com/v.mp4")), 403, "media_forbidden"),
        (dict(content=b"{" + b" " * 2_100_000 + b"}"), 413, "body_too_large"),
    ]
    for kwargs, status, code in cases:
        response = httpx.post(f"{server.http_url}/v1/chat/completions", headers=auth_headers(), timeout=60, **kwargs)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (kwargs.keys(), response.text)
    assert httpx.get(f"{server.http_url}/v1/nothing-here", headers=auth_headers()).status_code == 404
    server.wait_released()


def test_local_paths_only_under_the_media_root(server, video, mp4_bytes, tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "clip.mp4").write_bytes(mp4_bytes)
    (tmp_path / "secret.mp4").write_bytes(mp4_bytes)
    (root / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    question = video[2][0].text
    assert post_chat(server, chat_body(question, str(root / "clip.mp4"))).json()["error"]["code"] == "media_forbidden"
    with overridden_settings(server, media_root=root):
        for inside in ("clip.mp4", str(root / "clip.mp4"), f"file://{root / 'clip.mp4'}"):
            assert post_chat(server, chat_body(question, inside)).status_code == 200, inside
        for outside in (str(tmp_path / "secret.mp4"), "../secret.mp4", f"file://{tmp_path / 'secret.mp4'}", "link.mp4",
                        "/etc/passwd"):
            response = post_chat(server, chat_body(question, outside))
            assert (response.status_code, response.json()["error"]["code"]) == (403, "media_forbidden"), outside
        response = post_chat(server, chat_body(question, "missing.mp4"))
        assert (response.status_code, response.json()["error"]["code"]) == (422, "bad_media")


class _OneFile(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_http_media_urls_only_when_enabled_and_within_the_size_limit(server, video, mp4_bytes):
    _OneFile.body = mp4_bytes
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneFile)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{host.server_address[1]}/clip.mp4"
    question = video[2][0].text
    try:
        response = post_chat(server, chat_body(question, url))
        assert (response.status_code, response.json()["error"]["code"]) == (403, "media_forbidden")
        with overridden_settings(server, allow_remote_media=True):
            assert post_chat(server, chat_body(question, url)).status_code == 200
        with overridden_settings(server, allow_remote_media=True, max_media_bytes=len(mp4_bytes) - 1):
            response = post_chat(server, chat_body(question, url))
            assert (response.status_code, response.json()["error"]["code"]) == (413, "media_too_large")
    finally:
        host.shutdown()


# --- the trained model --------------------------------------------------------------------------

needs_trained_weights = pytest.mark.skipif(
    not TRAINED_WEIGHTS.exists(),
    reason="the trained vidsieve-tiny is not shipped (vlm/weights/vidsieve-tiny/model.safetensors)")


@pytest.fixture(scope="module")
def trained():
    with running_server(server_settings("vidsieve-tiny")) as running:
        yield running


def early_attribute_questions(count: int, frames_before: int = 8) -> list[tuple[int, sw.Question]]:
    """The first `count` (test clip, question) pairs asking the colour or shape of an object on
    screen from frame 0 to frame `frames_before` - 1: answerable mid-stream."""
    found = []
    for index in range(100):
        scene, questions = sw.scene_and_questions("test", index)
        for question in questions:
            obj = scene.objects[question.object_ids[0]] if question.object_ids else None
            if question.type == "attribute" and obj.first_frame == 0 and obj.last_frame >= frames_before - 1:
                found.append((index, question))
                break
        if len(found) == count:
            return found
    raise AssertionError("too few early attribute questions in 100 test clips")


async def stream_and_ask(server, frames, asks: dict[int, str]) -> dict[int, tuple[list[str], dict]]:
    """Push `frames` one by one (8 fps timestamps, the full-token window the model was trained on)
    and ask `asks[i]` right after frame i; the deltas and done event of each answer."""
    answers = {}
    async with await connect(server) as ws:
        await start_session(ws, fps=None, memory={"carriers": 0, "window_frames": len(frames)})
        for index, frame in enumerate(frames):
            await ws.send(frame_message(frame, index / 8.0))
            if index in asks:
                await send_json(ws, type="question", id=f"q{index}", text=asks[index], max_new_tokens=8)
                answers[index] = await answer(ws, f"q{index}")
    return answers


@pytest.mark.slow
@needs_trained_weights
def test_the_trained_model_answers_a_test_clip_right_mid_stream_and_after_the_last_frame(trained):
    for index, question in early_attribute_questions(3):
        frames, _, _ = clip("test", index)
        answers = asyncio.run(stream_and_ask(trained, frames, {7: question.text, len(frames) - 1: question.text}))
        for deltas, done in answers.values():
            assert deltas and "".join(deltas) == done["text"]
            assert done["text"].strip().lower() == question.answer, (index, question.text, done["text"])
        assert answers[7][1]["usage"]["frames_seen"] == 8
    trained.wait_released()


@pytest.mark.slow
@needs_trained_weights
def test_the_openai_client_gets_the_right_answer_about_a_video_data_url_from_the_trained_model(trained, tmp_path):
    client = openai_client(trained)
    for index, question in early_attribute_questions(3):
        path = tmp_path / f"test_{index}.mp4"
        sw.write_mp4(clip("test", index)[0], path, fps=8)
        messages = [{"role": "user", "content": [
            {"type": "text", "text": question.text},
            {"type": "video_url", "video_url": {"url": data_url(path.read_bytes(), "video/mp4")}}]}]
        plain = client.chat.completions.create(model="vidsieve-tiny", messages=messages, max_tokens=8)
        chunks = client.chat.completions.create(model="vidsieve-tiny", messages=messages, max_tokens=8, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert plain.choices[0].message.content.strip().lower() == streamed.strip().lower() == question.answer
    trained.wait_released()


@pytest.mark.slow
@needs_trained_weights
def test_the_trained_model_streams_the_right_answers_to_the_bundled_sample_questions(trained):
    """The two questions `make run` asks of each bundled clip, streamed frame by frame (so the
    answer is `VLM.answer`'s): all six right."""
    manifest = json.loads((Path(sw.__file__).parent / "samples" / "manifest.json").read_text())
    asked = [item for item in manifest if item["id"].endswith(("_0", "_1"))]
    wrong = []
    for item in asked:
        frames = sw.render(sw.scene_and_questions("samples", item["index"])[0])
        reply = asyncio.run(stream_and_ask(trained, frames, {len(frames) - 1: item["question"]}))
        if (text := reply[len(frames) - 1][1]["text"].strip().lower()) != item["answer"]:
            wrong.append((item["id"], text))
    assert len(asked) == 6 and not wrong, wrong
