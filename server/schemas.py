"""Every message the servers speak, as pydantic models: the WebSocket protocol of
`/v1/stream` (docs/protocol.md shows them) and the OpenAI-compatible HTTP API."""

from __future__ import annotations

import struct
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ==============================================================================================
# WebSocket /v1/stream
# ==============================================================================================

# A frame is ONE binary message: this 12-byte header, then the JPEG or PNG file.
FRAME_MAGIC = b"VSF1"
FRAME_HEADER = struct.Struct("<4sd")  # magic, timestamp in seconds (float64, little-endian)

ErrorCode = Literal[
    "bad_message",  # not JSON, unknown type, a wrong or missing field
    "bad_request",  # a frame or question the model could not serve (e.g. a compressor refused the frame)
    "bad_frame",  # a binary message that is not header + JPEG/PNG, or a corrupt image
    "bad_timestamp",  # frame time not finite, negative, or not after the previous frame's
    "bad_config",  # a session.start value out of range or unsupported by a live session
    "bad_spec",  # unknown compressor or attention spec
    "unknown_model",
    "unknown_question",  # cancel of a question that is neither queued nor being answered
    "not_started",  # frames or questions before session.start
    "already_started",
    "frame_too_large",  # frame bytes over the limit
    "rate_limited",  # more frames per second than the limit; the frame was dropped
    "session_too_long",  # frame time past the longest session; the frame was dropped
    "question_too_long",
    "too_many_tokens",  # max_new_tokens over the limit
    "backlog_full",  # too many frames or questions waiting; slow down
    "server_full",  # every session slot is taken (fatal; retry later)
    "shutting_down",
    "idle_timeout",  # fatal
    "slow_consumer",  # fatal: the client did not read its events
    "internal",  # a bug on our side; the session is closed
]


class MemorySpec(_Message):
    """The session's memory policy; omitted fields take the server's defaults."""

    carriers: int | None = Field(None, ge=0, description="VideoScan carriers held (0: none)")
    window_frames: int | None = Field(None, ge=0, description="recent frames that keep all their tokens")


class SessionStart(_Message):
    type: Literal["session.start"]
    model: str | None = Field(None, description="must be the served model's id when given")
    compressor: str = Field("none", max_length=200, description="per-frame spec, or videoscan:memory=N")
    attention: str = Field("dense", max_length=200, description="dense or bra:topk=8,block=64,...")
    fps: float | None = Field(None, gt=0, le=1000, description="frames kept per second of video time; "
                              "null keeps every frame; omitted: the server default")
    memory: MemorySpec = MemorySpec()
    reuse: str = Field("none", max_length=200, description="'patches[:threshold=T,refresh=N]' re-encodes only changed patches")


class QuestionMessage(_Message):
    type: Literal["question"]
    id: str | None = Field(None, min_length=1, max_length=64, description="echoed in answer events; default q1, q2, ...")
    text: str
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=2**63)


class CancelMessage(_Message):
    type: Literal["cancel"]
    id: str | None = Field(None, max_length=64, description="a question id; omitted cancels every question")


class PingMessage(_Message):
    type: Literal["ping"]
    id: str | None = Field(None, max_length=64)


class SessionEndMessage(_Message):
    type: Literal["session.end"]


ClientMessage = Annotated[
    Union[SessionStart, QuestionMessage, CancelMessage, PingMessage, SessionEndMessage],
    Field(discriminator="type"),
]
client_message = TypeAdapter(ClientMessage)


class SessionLimits(_Message):
    max_frame_bytes: int
    max_frame_side_px: int
    max_frames_per_s: float
    max_session_s: float
    max_question_chars: int
    max_new_tokens: int
    max_ws_message_bytes: int
    idle_timeout_s: float


class SessionStarted(_Message):
    type: Literal["session.started"] = "session.started"
    session_id: str
    model: str
    compressor: str  # canonical spec of the per-frame compressor
    attention: str
    fps: float | None
    memory: MemorySpec
    limits: SessionLimits


class Usage(_Message):
    visual_tokens_kept: int = Field(description="visual slots in the KV the answer read")
    visual_tokens_seen: int = Field(description="visual tokens encoded so far, before compression")
    frames_seen: int
    prompt_tokens: int = Field(description="tokens prefilled for this answer")
    completion_tokens: int
    time_to_first_token_s: float | None = Field(description="from the question's arrival to its first token")
    kv_bytes: int


class AnswerDeltaEvent(_Message):
    type: Literal["answer.delta"] = "answer.delta"
    question_id: str
    text: str


class AnswerDoneEvent(_Message):
    type: Literal["answer.done"] = "answer.done"
    question_id: str
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage


class ErrorEventMessage(_Message):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    question_id: str | None = None
    fatal: bool = False  # the server closes the connection after a fatal error


class PongMessage(_Message):
    type: Literal["pong"] = "pong"
    id: str | None = None


class SessionEnded(_Message):
    type: Literal["session.ended"] = "session.ended"
    frames_received: int
    frames_seen: int


ServerEvent = Annotated[
    Union[SessionStarted, AnswerDeltaEvent, AnswerDoneEvent, ErrorEventMessage, PongMessage, SessionEnded],
    Field(discriminator="type"),
]
server_event = TypeAdapter(ServerEvent)


# ==============================================================================================
# OpenAI-compatible HTTP
# ==============================================================================================


class TextPart(_Message):
    type: Literal["text"]
    text: str


class MediaURL(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. image_url.detail

    url: str = Field(description="data: URL, a path under the media root (or file://), or http(s) when enabled")


class ImagePart(_Message):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Message):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's request; fields we do not use are ignored. The question is the text of the
    last user message; its image_url parts are frames and a video_url part is a clip."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1)
    # vidsieve's own (extra_body in the openai client)
    compressor: str = Field("none", max_length=200, description="compressor spec, e.g. 'todre:ratio=0.25'")
    attention: str | None = Field(None, max_length=200)
    fps: float | None = Field(None, gt=0, le=120, description="sample the video at this rate")
    num_frames: int | None = Field(None, ge=1, description="frames uniform over the video (default: the model's)")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    visual_tokens_kept: int
    visual_tokens_seen: int
    time_to_first_token_s: float | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vidsieve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str  # "invalid_request_error", "authentication_error", "rate_limit_error", ...
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
