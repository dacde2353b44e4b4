"""`vidsieve serve` as an operator runs it: a subprocess that logs one JSON object per line and,
on SIGTERM, finishes the answer in flight before it closes the WebSocket and exits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import API_KEY, auth_headers, clip, frame_message, free_port, save_tiny_model, send_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parents[1]


def test_sigterm_drains_the_answer_in_flight_and_logs_are_json_lines_with_ids(tmp_path):
    import websockets

    folder = save_tiny_model(tmp_path / "model")
    port = free_port()
    env = dict(os.environ, VIDSIEVE_API_KEY=API_KEY, VIDSIEVE_DRAIN_TIMEOUT_S="30", VIDSIEVE_DEVICE="cpu",
               VIDSIEVE_MAX_NEW_TOKENS="256", VIDSIEVE_DEFAULT_FPS="8")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", str(folder)],
                                   cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        frames, timestamps_s, questions = clip("test", 2)

        async def ask_then_terminate():
            async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", additional_headers=auth_headers(),
                                          max_size=None) as ws:
                await send_json(ws, type="session.start", fps=None)
                events = [json.loads(await ws.recv())]
                for frame, timestamp_s in zip(frames[:4], timestamps_s[:4]):
                    await ws.send(frame_message(frame, timestamp_s))
                await send_json(ws, type="question", text=questions[0].text, max_new_tokens=256)
                events.append(json.loads(await ws.recv()))
                process.send_signal(signal.SIGTERM)
                try:
                    while True:
                        events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
                except websockets.ConnectionClosed as closed:
                    return events, closed.rcvd.code

        events, close_code = asyncio.run(ask_then_terminate())
        # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    types = [event["type"] for event in events]
    assert types[:2] == ["session.started", "answer.delta"], types
    done = [event for event in events if event["type"] == "answer.done"]
    assert done and done[0]["usage"]["completion_tokens"] > 1  # the answer in flight was finished
    assert events[-1]["type"] == "error" and events[-1]["code"] == "shutting_down" and events[-1]["fatal"]
    assert close_code == 1012
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]  # every line is JSON
    session_id = events[0]["session_id"]
    about_session = [r for r in records if r.get("session_id") == session_id]
    assert {"session started", "question", "answer done", "session closed"} <= {r["message"] for r in about_session}
    assert all(r.get("request_id") for r in about_session if r["logger"] == "vidsieve.ws")
    assert any(r["message"] == "request" and r.get("path") == "/health" and r.get("request_id") for r in records)
    assert any(r["message"] == "draining" for r in records)
    assert records[-1]["message"].startswith("Finished server process"), records[-1]
