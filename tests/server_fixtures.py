"""Shared by the streaming and server tests: a saved random-init vidsieve-tiny, a real uvicorn
on a free loopback port, ShapesWorld clips as the frames a client would send."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval import shapesworld as sw
from server.app import DrainingServer, create_app, uvicorn_config
from server.schemas import FRAME_HEADER, FRAME_MAGIC
from server.settings import Settings
from vlm.model import EMBEDDED_WEIGHTS, VLM, VLMConfig

API_KEY = "test-key-123"
TRAINED_WEIGHTS = EMBEDDED_WEIGHTS / "vidsieve-tiny" / "model.safetensors"
CLIP_FPS = 8  # ShapesWorld's frame rate


def tiny_model(seed: int = 0) -> VLM:
    """Random-init vidsieve-tiny with its LM weights scaled up, as tests/test_reuse.py does:
    sharper logits, so greedy answers differ by clip and question instead of repeating one
    token, and a wrong frame or position shows up as a different answer."""
    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"), seed=seed)
    with torch.no_grad():
        for parameter in model.lm.parameters():
            parameter.mul_(4.0)
    return model


def save_tiny_model(folder: Path) -> Path:
    tiny_model().save_pretrained(folder)
    return folder


def clip(split: str = "test", index: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """(frames uint8 [16, 128, 128, 3], timestamps_s [16], questions) of one ShapesWorld clip."""
    scene, questions = sw.scene_and_questions(split, index)
    frames = sw.render(scene)
    return frames, np.arange(len(frames)) / CLIP_FPS, questions


def image_bytes(rgb: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def frame_message(rgb: np.ndarray, timestamp_s: float, image_format: str = "PNG") -> bytes:
    """One WebSocket frame message: header, then the encoded image."""
    return FRAME_HEADER.pack(FRAME_MAGIC, timestamp_s) + image_bytes(rgb, image_format)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_settings(model_folder: Path, **overrides) -> Settings:
    """Settings for a test server: small limits so each one is cheap to hit."""
    values = dict(model=str(model_folder), api_key=API_KEY, device="cpu", max_sessions=4, max_frame_bytes=200_000,
                  max_frame_side_px=512, max_frames_per_s=200.0, max_session_s=3600.0, max_question_chars=200,
                  max_new_tokens=48, max_ws_message_bytes=400_000, max_request_bytes=2_000_000,
                  max_media_bytes=1_000_000, max_video_frames=32, idle_timeout_s=60.0, drain_timeout_s=5.0,
                  default_fps=8.0)
    values.update(overrides)
    return Settings(**values)


class RunningServer:
    """A real uvicorn serving `create_app(settings)` on 127.0.0.1, in a thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.port = free_port()
        self.app = create_app(settings)
        self.server = DrainingServer(uvicorn_config(self.app, settings, "127.0.0.1", self.port), self.app,
                                     settings.drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def engine(self):
        return self.app.state.engine

    def start(self, timeout_s: float = 60.0) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def wait_released(self, timeout_s: float = 10.0) -> None:
        """Until the engine holds no job and no KV (every session's memory released)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = self.engine.stats()
            if stats.sessions == 0 and stats.kv_bytes == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"engine still holds {self.engine.stats()}")


@contextlib.contextmanager
def running_server(settings: Settings):
    server = RunningServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


# --- a WebSocket client -----------------------------------------------------------------------


def auth_headers(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def connect(server: RunningServer, key: str = API_KEY):
    import websockets

    return await websockets.connect(server.ws_url, additional_headers=auth_headers(key), max_size=None,
                                    open_timeout=30)


async def receive(ws, timeout_s: float = 60.0) -> dict:
    import asyncio
    import json

    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


async def start_session(ws, **config) -> dict:
    import json

    await ws.send(json.dumps({"type": "session.start", **config}))
    started = await receive(ws)
    assert started["type"] == "session.started", started
    return started


async def send_json(ws, **message) -> None:
    import json

    await ws.send(json.dumps(message))


async def answer(ws, question_id: str) -> tuple[list[str], dict]:
    """Deltas and the done event of one question (fails on an error event)."""
    deltas = []
    while True:
        event = await receive(ws)
        assert event.get("question_id") == question_id, event
        if event["type"] == "answer.delta":
            deltas.append(event["text"])
        elif event["type"] == "answer.done":
            return deltas, event
        else:
            raise AssertionError(f"expected an answer, got {event}")


async def expect_error(ws, code: str) -> dict:
    event = await receive(ws)
    assert event["type"] == "error" and event["code"] == code, event
    return event


# --- pytest fixtures (import them into a test module) -----------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "vidsieve-tiny-random")


@pytest.fixture(scope="module")
def server(model_folder):
    with running_server(server_settings(model_folder)) as running:
        yield running


@pytest.fixture(scope="module")
def offline_model(model_folder) -> VLM:
    """The served weights, loaded in the test process for offline reference answers."""
    return VLM.from_pretrained(model_folder, device="cpu")


@contextlib.contextmanager
def overridden_settings(server: RunningServer, **changes):
    """Per-request settings changed for the duration (the engine's were fixed at start)."""
    from server.settings import get_settings

    changed = server.settings.model_copy(update=changes)
    server.app.dependency_overrides[get_settings] = lambda: changed
    try:
        yield changed
    finally:
        server.app.dependency_overrides[get_settings] = lambda: server.settings
