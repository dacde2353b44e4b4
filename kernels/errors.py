"""The root of every error a user can cause.

It lives in `kernels/`, the bottom of the import stack, so that every layer above
(compressors, vlm, streaming, server) can subclass it without importing upward.
Front doors catch `VidsieveError` and turn it into a clear message, an HTTP 4xx or a
WebSocket error event; anything else is a bug.
"""


class VidsieveError(Exception):
    """Base class for errors caused by user input (bad video, bad spec, over-limit input)."""
