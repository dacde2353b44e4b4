"""OpenAI-compatible HTTP: `GET /v1/models` and `POST /v1/chat/completions`.

The question is the text of the last user message; its `image_url` parts are frames, its
`video_url` part a clip (sampled like `vidsieve annotate`: the model's frame count unless
`fps` or `num_frames` is given). `compressor` (and `attention`) ride along as extra body
fields, and any compressor works here, question-aware ones included, because the question
is known before the video is compressed. Each request is a one-shot `ClipAnswer` on the
engine; `stream: true` sends server-sent events as OpenAI does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from compressors import parse_spec
from kernels import AttentionSpec
from kernels.errors import VidsieveError
from server.auth import require_api_key
from server.channel import EventChannel
from server.errors import ApiError, api_error
from server.media import load_frames
from server.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    ErrorDetail,
    ErrorResponse,
    ImagePart,
    ModelCard,
    ModelList,
    TextPart,
    VideoPart,
)
from server.settings import Settings, get_settings
from streaming.session import AnswerDelta, AnswerDone, ClipAnswer, ErrorEvent, Question
from streaming.video import SamplingPlan

log = logging.getLogger("vidsieve.http")
router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = request.app.state
    return ModelList(data=[ModelCard(id=state.model_id, created=state.started_at)])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, settings: Settings = Depends(get_settings)):
    state = request.app.state
    engine = state.engine
    chat = parse_request(await read_body(request, settings.max_request_bytes))
    if chat.model != state.model_id:
        raise ApiError("unknown_model", f"model {chat.model!r} is not served here; this server serves "
                       f"{state.model_id!r}", param="model")
    question, parts = split_messages(chat, settings)
    max_new_tokens = chat.max_completion_tokens or chat.max_tokens or settings.default_max_new_tokens
    if max_new_tokens > settings.max_new_tokens:
        raise ApiError("too_many_tokens", f"max_tokens is limited to {settings.max_new_tokens}", param="max_tokens")
    if engine.stats().sessions >= engine.config.max_sessions:  # refuse before decoding any media
        raise ApiError("server_full", "all sessions are in use; try again shortly",
                       headers={"Retry-After": str(settings.retry_after_s)})
    try:
        spec = parse_spec(chat.compressor)
        attention = chat.attention or settings.attention
        AttentionSpec.parse(attention)
        plan = SamplingPlan(fps=chat.fps, num_frames=chat.num_frames or (None if chat.fps else state.model.config.num_frames),
                            max_frames=settings.max_video_frames)
        frames, timestamps_s = await load_frames(parts, plan, settings)
        sampling = dataclasses.replace(state.model.default_sampling(max_new_tokens), temperature=chat.temperature or 0.0,
                                       top_p=chat.top_p or 1.0, seed=chat.seed or 0)
        channel = EventChannel(settings.client_queue_events, on_room=engine.notify)
        job = ClipAnswer(state.model, frames, timestamps_s, Question("0", question, sampling), spec, channel.emit,
                         job_id=uuid.uuid4().hex[:16], attention=attention, can_emit=channel.can_emit)
        engine.admit(job)
    except VidsieveError as error:
        raise api_error(error, settings.retry_after_s) from None
    completion_id = f"chatcmpl-{job.job_id}"
    log.info("chat completion", extra={"job_id": job.job_id, "frames": len(frames), "compressor": spec.text,
                                       "stream": chat.stream})
    if chat.stream:
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        return StreamingResponse(stream_events(request, job, channel, completion_id, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        done = await collect_answer(request, channel)
    finally:
        engine.close(job)
    return ChatCompletion(id=completion_id, created=int(time.time()), model=state.model_id,
                          choices=[Choice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
                          usage=completion_usage(done))


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError("body_too_large", f"request body is over the {max_bytes} byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError("body_too_large", f"request body is over the {max_bytes} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] in ("json_invalid", "json_type"):
            raise ApiError("invalid_json", "the request body is not a JSON object") from None
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError("bad_request", f"{where}: {first['msg']}", param=where or None) from None


def split_messages(chat: ChatCompletionRequest, settings: Settings) -> tuple[str, list[ImagePart | VideoPart]]:
    """(question, media parts) of the last user message; earlier turns are not used."""
    users = [message for message in chat.messages if message.role == "user"]
    if not users:
        raise ApiError("bad_request", "messages need a user message with the question", param="messages")
    content = users[-1].content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
    question = " ".join(part.text for part in parts if isinstance(part, TextPart)).strip()
    if not question:
        raise ApiError("bad_request", "the last user message has no question text", param="messages")
    if len(question) > settings.max_question_chars:
        raise ApiError("question_too_long", f"question is {len(question)} characters; the limit is "
                       f"{settings.max_question_chars}", param="messages")
    return question, [part for part in parts if not isinstance(part, TextPart)]


async def next_event(request: Request, channel: EventChannel):
    """The next event, or None when the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(channel.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


async def collect_answer(request: Request, channel: EventChannel) -> AnswerDone:
    while True:
        event = await next_event(request, channel)
        if event is None:
            raise ApiError("bad_request", "client disconnected")
        if isinstance(event, AnswerDone):
            request.app.state.metrics.observe_answer("http", event)
            return event
        if isinstance(event, ErrorEvent):
            request.app.state.metrics.errors.labels("http", event.code).inc()
            raise ApiError(event.code, event.message)


async def stream_events(request: Request, job: ClipAnswer, channel: EventChannel, completion_id: str,
                        include_usage: bool):
    state = request.app.state
    created = int(time.time())

    def chunk(delta: Delta, finish_reason=None, usage=None) -> str:
        body = ChatCompletionChunk(id=completion_id, created=created, model=state.model_id,
                                   choices=[] if usage else [ChunkChoice(delta=delta, finish_reason=finish_reason)],
                                   usage=usage)
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    try:
        yield chunk(Delta(role="assistant", content=""))
        while True:
            event = await next_event(request, channel)
            if event is None:
                return
            if isinstance(event, AnswerDelta):
                yield chunk(Delta(content=event.text))
            elif isinstance(event, AnswerDone):
                state.metrics.observe_answer("http", event)
                yield chunk(Delta(), finish_reason=event.finish_reason)
                if include_usage:
                    yield chunk(Delta(), usage=completion_usage(event))
                yield "data: [DONE]\n\n"
                return
            elif isinstance(event, ErrorEvent):
                state.metrics.errors.labels("http", event.code).inc()
                error = ErrorResponse(error=ErrorDetail(message=event.message, type="invalid_request_error"
                                                        if event.code != "internal" else "server_error", code=event.code))
                yield f"data: {error.model_dump_json()}\n\n"
                return
    finally:
        state.engine.close(job)


def completion_usage(done: AnswerDone) -> CompletionUsage:
    usage = dataclasses.asdict(done.usage)
    return CompletionUsage(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                           total_tokens=usage["prompt_tokens"] + usage["completion_tokens"],
                           visual_tokens_kept=usage["visual_tokens_kept"], visual_tokens_seen=usage["visual_tokens_seen"],
                           time_to_first_token_s=usage["time_to_first_token_s"])
