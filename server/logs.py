"""Structured logs: one JSON object per line, each carrying the request or session it is about.

A front door sets `request_id` (every HTTP request and WebSocket connection) and `session_id`
(a live session) in context variables; the formatter adds them to every record logged in
that context. The model thread has no such context, so the engine passes `session_id` as
`extra=`. `grep '"session_id": "abc"'` then follows one session from connect to close.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
session_id_var: ContextVar[str | None] = ContextVar("session_id", default=None)

_STANDARD_FIELDS = (set(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
                    | {"message", "asctime", "taskName", "color_message"})  # uvicorn's coloured copy


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, variable in (("request_id", request_id_var), ("session_id", session_id_var)):
            value = getattr(record, name, None) or variable.get()
            if value:
                entry[name] = value
        entry.update({key: value for key, value in vars(record).items()
                      if key not in _STANDARD_FIELDS and key not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every logger (ours and uvicorn's) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
