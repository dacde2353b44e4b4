"""EventChannel: a live session's or an HTTP answer's events, from the model thread to the
coroutine that writes them to one client.

The bound is soft and enforced upstream: the engine asks `can_emit()` before each decode
step, so once `capacity` events wait unread, that client's answers pause (the model serves
the others) until its writer catches up. Frames never wait on it; a few error or done events
may go past the bound, never more than a handful.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class EventChannel:
    def __init__(self, capacity: int, on_room: Callable[[], None] = lambda: None):
        self.capacity = capacity
        self._on_room = on_room  # wakes the engine when a paused client can take events again
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # guarded by _lock; counts events handed over but not yet taken

    def can_emit(self) -> bool:
        with self._lock:
            return self._waiting < self.capacity

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def emit(self, event: object) -> None:
        """Hand an event over; safe from any thread."""
        with self._lock:
            self._waiting += 1
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self) -> object:
        event = await self._queue.get()
        with self._lock:
            self._waiting -= 1
            room_again = self._waiting == self.capacity - 1
        if room_again:
            self._on_room()
        return event
