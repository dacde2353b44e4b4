"""WS /v1/stream: one live video session per connection (protocol: docs/protocol.md).

Two coroutines per connection: the reader parses client messages in arrival order (frames
are decoded off the event loop, one at a time, so a question always comes after the frames
sent before it), and the writer sends events from the connection's `EventChannel`, where the
model thread and the reader both put them. Every client mistake is answered with an `error`
event; only fatal ones (server full, idle, slow consumer, shutdown) close the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from typing import get_args

from fastapi import APIRouter, Depends, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from kernels.errors import VidsieveError
from server.auth import authorized, deny_websocket
from server.channel import EventChannel
from server.errors import error_code
from server.logs import session_id_var
from server.schemas import (
    FRAME_HEADER,
    FRAME_MAGIC,
    AnswerDeltaEvent,
    AnswerDoneEvent,
    CancelMessage,
    ErrorCode,
    ErrorEventMessage,
    MemorySpec,
    PingMessage,
    PongMessage,
    QuestionMessage,
    SessionEnded,
    SessionEndMessage,
    SessionLimits,
    SessionStart,
    SessionStarted,
    Usage,
    client_message,
)
from server.settings import Settings, get_settings
from streaming.media import MediaError, decode_image
from streaming.session import (
    AnswerDelta,
    AnswerDone,
    ErrorEvent,
    MemoryPolicy,
    Question,
    Session,
    SessionConfig,
)

log = logging.getLogger("vidsieve.ws")
router = APIRouter()

CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_INTERNAL, CLOSE_RESTART, CLOSE_TRY_LATER = (
    1000, 1001, 1008, 1011, 1012, 1013)
ERROR_CODES = frozenset(get_args(ErrorCode))
FATAL_CLOSE_CODES = {"server_full": CLOSE_TRY_LATER, "shutting_down": CLOSE_RESTART, "idle_timeout": CLOSE_GOING_AWAY,
                     "slow_consumer": CLOSE_POLICY, "internal": CLOSE_INTERNAL}


@dataclasses.dataclass(frozen=True)
class _Close:
    """Put in the channel after the last event: the writer closes the socket with `code`."""

    code: int


class RateLimiter:
    """A token bucket: `rate` events per second, bursts up to one second's worth."""

    def __init__(self, rate: float):
        self.rate = rate
        self._tokens = max(rate, 1.0)
        self._at = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(max(self.rate, 1.0), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket, settings: Settings = Depends(get_settings)) -> None:
    if not authorized(websocket.headers.get("authorization"), settings):
        await deny_websocket(websocket)
        return
    await websocket.accept()
    connection = StreamConnection(websocket, settings)
    connections = websocket.app.state.connections
    connections.add(connection)
    try:
        await connection.run()
    finally:
        connections.discard(connection)


class StreamConnection:
    def __init__(self, websocket: WebSocket, settings: Settings):
        state = websocket.app.state
        self.websocket = websocket
        self.settings = settings
        self.engine = state.engine
        self.metrics = state.metrics
        self.model_id = state.model_id
        self.session: Session | None = None
        self.channel = EventChannel(settings.client_queue_events, on_room=self.engine.notify)
        self.frame_rate = RateLimiter(settings.max_frames_per_s)
        self._open_questions: set[str] = set()
        self._questions_asked = 0
        self._closing = False

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        close_code = None
        try:
            close_code = await self._read()
        finally:
            if self.session is not None:
                self.engine.close(self.session)
                log.info("session closed", extra={"session_id": self.session.session_id,
                                                  "frames_received": self.session.frames_received,
                                                  "frames_seen": self.session.frames_seen})
            if close_code is None:  # the client went away: nothing more to send
                writer.cancel()
            else:
                self.channel.emit(_Close(close_code))
            try:
                await asyncio.wait_for(writer, timeout=5.0)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                pass

    def shutdown_soon(self) -> None:
        """Tell the client the server is going away, then close (SIGTERM drain)."""
        if not self._closing:
            self._closing = True
            self.channel.emit(ErrorEvent("shutting_down", "the server is shutting down", fatal=True))
            self.channel.emit(_Close(CLOSE_RESTART))

    # --- reading ----------------------------------------------------------------------------

    async def _read(self) -> int | None:
        """Handle client messages until the client leaves (None) or the session must end
        (the close code, after a final event was queued)."""
        while not self._closing:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), self.settings.idle_timeout_s)
            except asyncio.TimeoutError:
                if self.session is not None and self.session.answering():
                    continue
                return self._fatal("idle_timeout", f"no message for {self.settings.idle_timeout_s:g} s")
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("bytes") is not None:
                await self._on_frame(message["bytes"])
            elif message.get("text") is not None:
                ended = await self._on_text(message["text"])
                if ended is not None:
                    return ended
            if self.session is not None and self.session.closed:  # the engine ended it (internal error)
                return CLOSE_INTERNAL
        return None

    async def _on_text(self, text: str) -> int | None:
        try:
            message = client_message.validate_json(text)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "message"
            self._error("bad_message", f"{where}: {first['msg']}" if first["type"] != "json_invalid"
                        else "message is not valid JSON")
            return None
        if isinstance(message, SessionStart):
            return self._on_start(message)
        if isinstance(message, PingMessage):
            self.channel.emit(PongMessage(id=message.id))
            return None
        if self.session is None:
            self._error("not_started", f"send session.start before {message.type}")
            return None
        if isinstance(message, QuestionMessage):
            self._on_question(message)
        elif isinstance(message, CancelMessage):
            if not self.session.cancel(message.id):
                self._error("unknown_question", f"no question {message.id!r} is waiting or being answered"
                            if message.id else "no question is waiting or being answered", message.id)
            self.engine.notify()
        elif isinstance(message, SessionEndMessage):
            self.engine.close(self.session)
            self.channel.emit(SessionEnded(frames_received=self.session.frames_received,
                                           frames_seen=self.session.frames_seen))
            return CLOSE_NORMAL
        return None

    def _on_start(self, message: SessionStart) -> int | None:
        settings = self.settings
        if self.session is not None:
            self._error("already_started", "this connection already has a session")
            return None
        if message.model is not None and message.model != self.model_id:
            self._error("unknown_model", f"model {message.model!r} is not served here; this server serves {self.model_id!r}")
            return None
        carriers = settings.default_carriers if message.memory.carriers is None else message.memory.carriers
        window = settings.default_window_frames if message.memory.window_frames is None else message.memory.window_frames
        if carriers > settings.max_carriers or window > settings.max_window_frames:
            self._error("bad_config", f"memory is limited to {settings.max_carriers} carriers and "
                        f"{settings.max_window_frames} window frames")
            return None
        fps = message.fps if "fps" in message.model_fields_set else settings.default_fps
        session_id = uuid.uuid4().hex[:16]
        try:
            config = SessionConfig(compressor=message.compressor, attention=message.attention, fps=fps,
                                   memory=MemoryPolicy(carriers, window), reuse=message.reuse,
                                   max_pending_frames=settings.max_pending_frames,
                                   max_pending_questions=settings.max_pending_questions)
            session = Session(self.engine.model, config, self.channel.emit, session_id=session_id,
                              can_emit=self.channel.can_emit)
            self.engine.admit(session)
        except VidsieveError as error:
            code = error_code(error)
            if code in FATAL_CLOSE_CODES:
                return self._fatal(code, str(error))
            self._error(code, str(error))
            return None
        self.session = session
        session_id_var.set(session_id)
        log.info("session started", extra={"session_id": session_id, "compressor": session.spec.text,
                                           "memory": dataclasses.asdict(session.config.memory), "fps": fps})
        memory = session.config.memory
        self.channel.emit(SessionStarted(
            session_id=session_id, model=self.model_id, compressor=session.spec.text, attention=message.attention,
            fps=fps, memory=MemorySpec(carriers=memory.carriers, window_frames=memory.window_frames),
            limits=SessionLimits(
                max_frame_bytes=settings.max_frame_bytes, max_frame_side_px=settings.max_frame_side_px,
                max_frames_per_s=settings.max_frames_per_s, max_session_s=settings.max_session_s,
                max_question_chars=settings.max_question_chars, max_new_tokens=settings.max_new_tokens,
                max_ws_message_bytes=settings.max_ws_message_bytes, idle_timeout_s=settings.idle_timeout_s)))
        return None

    async def _on_frame(self, data: bytes) -> None:
        settings = self.settings
        if self.session is None:
            self._error("not_started", "send session.start before frames")
            return
        if len(data) - FRAME_HEADER.size > settings.max_frame_bytes:
            self._error("frame_too_large", f"frame is {len(data) - FRAME_HEADER.size} bytes; "
                        f"the limit is {settings.max_frame_bytes}")
            return
        if len(data) <= FRAME_HEADER.size or data[:4] != FRAME_MAGIC:
            self._error("bad_frame", f"a frame is one binary message: {FRAME_MAGIC!r}, the timestamp as "
                        f"float64 little-endian, then the JPEG or PNG bytes")
            return
        _, timestamp_s = FRAME_HEADER.unpack_from(data)
        self.metrics.frames.inc()
        if not self.frame_rate.allow():
            self._error("rate_limited", f"more than {settings.max_frames_per_s:g} frames per second; "
                        f"frame at {timestamp_s:.3f} s dropped")
            return
        if math.isfinite(timestamp_s) and timestamp_s > settings.max_session_s:
            self._error("session_too_long", f"frame at {timestamp_s:.3f} s is past the "
                        f"{settings.max_session_s:g} s session limit; dropped")
            return
        image = data[FRAME_HEADER.size:]
        try:
            await asyncio.to_thread(self.session.push_frame, timestamp_s,
                                    lambda: decode_image(image, max_side_px=settings.max_frame_side_px))
        except MediaError as error:
            self._error("bad_frame", str(error))
            return
        except VidsieveError as error:
            self._error(error_code(error), str(error))
            return
        self.engine.notify()

    def _on_question(self, message: QuestionMessage) -> None:
        settings = self.settings
        text = message.text.strip()
        if not text:
            self._error("bad_message", "question text is empty", message.id)
            return
        if len(message.text) > settings.max_question_chars:
            self._error("question_too_long", f"question is {len(message.text)} characters; "
                        f"the limit is {settings.max_question_chars}", message.id)
            return
        max_new_tokens = message.max_new_tokens or settings.default_max_new_tokens
        if max_new_tokens > settings.max_new_tokens:
            self._error("too_many_tokens", f"max_new_tokens is limited to {settings.max_new_tokens}", message.id)
            return
        self._questions_asked += 1
        question_id = message.id or f"q{self._questions_asked}"
        if question_id in self._open_questions:
            self._error("bad_message", f"question id {question_id!r} is still being answered", question_id)
            return
        sampling = dataclasses.replace(self.engine.model.default_sampling(max_new_tokens), temperature=message.temperature,
                                       top_p=message.top_p, seed=message.seed)
        try:
            self.session.ask(Question(question_id, text, sampling))
        except VidsieveError as error:
            self._error(error_code(error), str(error), question_id)
            return
        self._open_questions.add(question_id)
        log.info("question", extra={"question_id": question_id, "chars": len(text)})
        self.engine.notify()

    def _error(self, code: str, message: str, question_id: str | None = None) -> None:
        self.channel.emit(ErrorEvent(code, message, question_id))

    def _fatal(self, code: str, message: str) -> int:
        self.channel.emit(ErrorEvent(code, message, fatal=True))
        return FATAL_CLOSE_CODES[code]

    # --- writing ----------------------------------------------------------------------------

    async def _write(self) -> None:
        while True:
            event = await self.channel.get()
            if isinstance(event, _Close):
                await self._close(event.code)
                return
            wire = self._to_wire(event)
            try:
                await asyncio.wait_for(self.websocket.send_text(wire.model_dump_json()),
                                       self.settings.slow_consumer_timeout_s)
            except asyncio.TimeoutError:
                log.warning("slow consumer dropped", extra={"session_id": self._session_id})
                self.metrics.errors.labels("ws", "slow_consumer").inc()
                if self.session is not None:
                    self.engine.close(self.session)
                await self._close(CLOSE_POLICY)
                return
            except (WebSocketDisconnect, RuntimeError, OSError):
                return

    def _to_wire(self, event):
        if isinstance(event, AnswerDelta):
            return AnswerDeltaEvent(question_id=event.question_id, text=event.text)
        if isinstance(event, AnswerDone):
            self._open_questions.discard(event.question_id)
            self.metrics.observe_answer("ws", event)
            log.info("answer done", extra={"session_id": self._session_id, "question_id": event.question_id,
                                           "finish_reason": event.finish_reason,
                                           "time_to_first_token_s": event.usage.time_to_first_token_s,
                                           "visual_tokens_kept": event.usage.visual_tokens_kept})
            return AnswerDoneEvent(question_id=event.question_id, text=event.text, finish_reason=event.finish_reason,
                                   usage=Usage(**dataclasses.asdict(event.usage)))
        if isinstance(event, ErrorEvent):
            if event.question_id is not None:
                self._open_questions.discard(event.question_id)
            code = event.code if event.code in ERROR_CODES else "bad_request"
            self.metrics.errors.labels("ws", code).inc()
            log.info("error event", extra={"session_id": self._session_id, "code": code,
                                           "error": event.message, "fatal": event.fatal})
            return ErrorEventMessage(code=code, message=event.message, question_id=event.question_id,
                                     fatal=event.fatal)
        return event  # already a schema model

    async def _close(self, code: int) -> None:
        try:
            await self.websocket.close(code)
        except (RuntimeError, OSError):
            pass

    @property
    def _session_id(self) -> str | None:
        return self.session.session_id if self.session is not None else None
