"""Fuzz: hundreds of malformed WebSocket messages and HTTP bodies. Each one gets exactly one
error event or a 4xx, never a 500, a dropped connection or a dead server; well-formed
clients are served afterwards."""

from __future__ import annotations

import asyncio
import base64
import json
import random

import httpx
import pytest

from server.schemas import FRAME_HEADER, FRAME_MAGIC, server_event
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    answer,
    auth_headers,
    clip,
    connect,
    frame_message,
    image_bytes,
    model_folder,
    receive,
    send_json,
    server,
    start_session,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FRAME_CODES = {"bad_frame", "frame_too_large", "rate_limited", "bad_timestamp", "session_too_long"}
VALID_QUESTION = {"type": "question", "text": "What colour is the circle?"}


def random_text(rng: random.Random, length: int) -> str:
    alphabet = "{}[]\":,0123456789abcdefghijklmnopqrstuvwxyz \\\n\t\u00e9\u4e2d\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(length))


def malformed_text(rng: random.Random) -> str:
    """A text message that is never a valid client message."""
    kind = rng.randrange(6)
    if kind == 0:
        return random_text(rng, rng.randrange(0, 300))
    if kind == 1:  # valid JSON cut short
        whole = json.dumps(rng.choice([VALID_QUESTION, {"type": "session.start", "fps": 2.0}, {"type": "ping"}]))
        return whole[: rng.randrange(0, len(whole))]
    if kind == 2:  # wrong types and missing fields
        return json.dumps(rng.choice([
            {"type": "question", "text": 123}, {"type": "question"}, {"type": 5}, {"type": "frame"}, [], "question",
            None, 3.5, {"type": "session.start", "fps": "fast"}, {"type": "session.start", "memory": {"carriers": -1}},
            {"type": "question", "text": "a", "max_new_tokens": -1}, {"type": "question", "text": "a", "top_p": 0},
            {"type": "cancel", "id": {}}, {"type": "ping", "id": ["x"]}, {"type": "question", "text": "a", "extra": 1},
            {"type": "session.start", "compressor": None}, {"type": "question", "text": ["a"]},
        ]))
    if kind == 3:  # deep nesting
        depth = rng.randrange(50, 3000)
        return "[" * depth + "]" * depth
    if kind == 4:  # numbers out of every range
        return '{"type": "question", "text": "a", "seed": 1e400}'
    return json.dumps({"type": random_text(rng, 8)})


def malformed_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 2000))
    if kind == 1:  # the right header, garbage after it
        return FRAME_HEADER.pack(FRAME_MAGIC, rng.uniform(0, 100)) + rng.randbytes(rng.randrange(0, 500))
    if kind == 2:  # oversize (over max_frame_bytes, under the WebSocket limit)
        return FRAME_HEADER.pack(FRAME_MAGIC, 1.0) + rng.randbytes(250_000)
    if kind == 3:  # bad timestamps
        return FRAME_HEADER.pack(FRAME_MAGIC, rng.choice([float("nan"), float("inf"), -1.0, -1e300])) + b"\x89PNG"
    return FRAME_MAGIC + rng.randbytes(rng.randrange(0, 8))  # truncated header


def test_hundreds_of_malformed_websocket_messages_get_one_error_event_each(server):
    rng = random.Random(7)
    frames, _, questions = clip("test", 1)

    async def run():
        async with await connect(server) as ws:
            replies = []
            # out of order: everything before session.start
            for _ in range(40):
                message = rng.choice([malformed_frame(rng), json.dumps(VALID_QUESTION),
                                      json.dumps({"type": "cancel"}), frame_message(frames[0], 0.0)])
                await ws.send(message)
                replies.append(("before", await receive(ws, 30)))
            await start_session(ws, fps=None)
            for index in range(260):
                if index % 3 == 0:
                    await ws.send(malformed_frame(rng))
                    kind = "frame"
                elif index % 17 == 0:
                    await send_json(ws, type="session.start")
                    kind = "start"
                else:
                    await ws.send(malformed_text(rng))
                    kind = "text"
                replies.append((kind, await receive(ws, 30)))
            # the same connection still works
            await ws.send(frame_message(frames[3], 500.0))
            await send_json(ws, type="question", id="after-fuzz", text=questions[0].text, max_new_tokens=4)
            _, done = await answer(ws, "after-fuzz")
            return replies, done

    replies, done = asyncio.run(run())
    assert len(replies) == 300
    expected = {"before": {"not_started"}, "frame": FRAME_CODES, "start": {"already_started"}, "text": {"bad_message"}}
    for kind, reply in replies:
        server_event.validate_python(reply)  # every reply is a documented server event
        assert reply["type"] == "error" and not reply["fatal"], (kind, reply)
        assert reply["code"] in expected[kind], (kind, reply)
    assert done["usage"]["frames_seen"] == 1
    server.wait_released()

    async def fresh_client():
        async with await connect(server) as ws:
            await start_session(ws, fps=None)
            await ws.send(frame_message(frames[0], 0.0))
            await send_json(ws, type="question", text=questions[0].text, max_new_tokens=4)
            return await answer(ws, "q1")

    assert asyncio.run(fresh_client())[1]["type"] == "answer.done"


def valid_body(image_url: str) -> dict:
    return {"model": "vidsieve-tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colour is the circle?"}, {"type": "image_url", "image_url": {"url": image_url}}]}]}


def malformed_body(rng: random.Random, good: dict) -> bytes:
    """A request body that is never a valid chat completion request."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 400))
    if kind == 1:
        whole = json.dumps(good).encode()
        return whole[: rng.randrange(0, len(whole))]
    body = json.loads(json.dumps(good))
    if kind == 2:
        del body[rng.choice(["model", "messages"])]
    elif kind == 3:
        field, values = rng.choice([("messages", [5, "x", {}, [], [None]]), ("model", [5, None, []]),
                                    ("max_tokens", [-3, "many", 0, 1.5]), ("temperature", [-1, "hot", 9]),
                                    ("n", [2, 0]), ("top_p", [0, 7]), ("compressor", ["nope", 3, "random:ratio=7"]),
                                    ("fps", [-1, "x"]), ("num_frames", [0, -2])])
        body[field] = rng.choice(values)
    elif kind == 4:
        part = rng.choice([{"type": "audio", "audio": {}}, {"type": "image_url", "image_url": "x"},
                           {"type": "image_url"}, {"type": "text", "text": 5}, {"type": "video_url", "video_url": {}}])
        body["messages"][0]["content"].append(part)
    else:
        garbage = base64.b64encode(rng.randbytes(rng.randrange(1, 300))).decode()
        kind_of_url = rng.choice(["image/png", "video/mp4"])
        body["messages"][0]["content"][1] = {"type": "image_url" if kind_of_url == "image/png" else "video_url",
                                             "image_url" if kind_of_url == "image/png" else "video_url":
                                             {"url": f"data:{kind_of_url};base64,{garbage}"}}
    return json.dumps(body).encode()


def test_malformed_http_bodies_get_4xx_and_a_good_request_is_answered_after(server):
    rng = random.Random(11)
    frames, _, questions = clip("test", 1)
    good = valid_body("data:image/png;base64," + base64.b64encode(image_bytes(frames[0])).decode())
    statuses = []
    with httpx.Client(base_url=server.http_url, headers=auth_headers(), timeout=30) as client:
        for _ in range(150):
            response = client.post("/v1/chat/completions", content=malformed_body(rng, good),
                                   headers={"content-type": rng.choice(["application/json", "text/plain", "x/y"])})
            statuses.append(response.status_code)
            assert 400 <= response.status_code < 500, response.text
            assert response.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json=good).status_code == 200
    assert {400, 422} <= set(statuses)
    server.wait_released()
