"""Server settings: environment variables `VIDSIEVE_*`, read once.

Every route reads them through `get_settings`, one cached getter; tests override it with
`app.dependency_overrides[get_settings] = lambda: Settings(...)` or pass `create_app(settings)`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIDSIEVE_", extra="ignore")

    # the model
    model: str = Field("vidsieve-tiny", description="folder, preset or hub id of the served model")
    served_model_name: str | None = Field(None, description="id in /v1/models (default: the model config's name)")
    device: str | None = None
    dtype: str | None = None
    attention: str = "dense"
    torch_threads: int | None = Field(None, ge=1)

    # access
    api_key: SecretStr | None = Field(None, description="when set, every route but /health needs 'Authorization: Bearer <key>'")
    media_root: Path | None = Field(None, description="local media paths are allowed only under this folder")
    allow_remote_media: bool = Field(False, description="fetch http(s) image/video URLs")
    remote_media_timeout_s: float = Field(10.0, gt=0)

    # limits
    max_sessions: int = Field(8, ge=1, description="live WebSocket sessions plus HTTP answers in flight")
    retry_after_s: int = Field(2, ge=1, description="Retry-After on 429")
    max_frame_bytes: int = Field(2_000_000, ge=1, description="one encoded JPEG/PNG frame")
    max_frame_side_px: int = Field(1920, ge=16)
    max_frames_per_s: float = Field(60.0, gt=0, description="frames a session may push per wall-clock second")
    max_session_s: float = Field(4 * 3600.0, gt=0, description="longest stream, in seconds of video time")
    max_question_chars: int = Field(1000, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    default_max_new_tokens: int = Field(32, ge=1)
    max_ws_message_bytes: int = Field(4_000_000, ge=1024, description="larger WebSocket messages close the connection (1009)")
    max_request_bytes: int = Field(64_000_000, ge=1024, description="HTTP request body")
    max_media_bytes: int = Field(48_000_000, ge=1, description="one decoded data URL or downloaded file")
    max_video_frames: int = Field(64, ge=1, description="frames sampled from a video sent over HTTP")
    idle_timeout_s: float = Field(300.0, gt=0, description="a WebSocket with no message and nothing to answer is closed")
    ws_ping_interval_s: float = Field(20.0, gt=0)
    max_pending_frames: int = Field(64, ge=1, description="frames a session may queue ahead of the model")
    max_pending_questions: int = Field(4, ge=1)
    client_queue_events: int = Field(256, ge=8, description="events queued for one client before its answers pause")
    slow_consumer_timeout_s: float = Field(30.0, gt=0, description="a client whose queue stays full this long is dropped")
    max_carriers: int = Field(1024, ge=1)
    max_window_frames: int = Field(64, ge=0)
    drain_timeout_s: float = Field(10.0, ge=0, description="on SIGTERM, time given to answers in flight")

    # defaults of a live session
    default_fps: float = Field(2.0, gt=0)
    default_carriers: int = Field(64, ge=0)
    default_window_frames: int = Field(4, ge=0)

    log_level: str = "INFO"


@lru_cache
def get_settings() -> Settings:
    return Settings()
