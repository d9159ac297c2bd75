"""Errors a caller of the serving front can get, each with an HTTP status and a retry hint.

Every error reaches the caller as one of these (over HTTP: ``{"error": kind, "message": ...,
"retriable": bool}`` with :attr:`ServeError.status`). Errors about a request (a bad frame, an
unknown model, a refused sequence number) are raised before any stream state is touched.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base class: ``status`` is the HTTP status, ``retriable`` says whether sending the same
    frame again (same sequence number) can succeed."""

    status = 500
    retriable = False
    kind = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    #: seconds a client should wait before sending the same frame again (None: no hint)
    retry_after_s: float | None = None

    def to_dict(self) -> dict:
        d = {"error": self.kind, "message": self.message, "retriable": self.retriable, "status": self.status}
        if self.retry_after_s is not None:
            d["retry_after_s"] = float(self.retry_after_s)
        return d


class BadRequest(ServeError):
    """The request itself is malformed (missing stream id or sequence number, bad option)."""

    status = 400
    kind = "bad_request"


class BadFrame(ServeError):
    """The frame cannot be used: undecodable image, wrong size or channels, NaN/Inf, bad dtype."""

    status = 422
    kind = "bad_frame"


class UnknownModel(ServeError):
    """The request names a model this application does not serve."""

    status = 404
    kind = "unknown_model"


class UnknownStream(ServeError):
    """A reset named a stream that holds no state."""

    status = 404
    kind = "unknown_stream"


class SequenceError(ServeError):
    """A frame's sequence number is not above the last one accepted for its stream (a duplicate
    or an out-of-order frame); the frame is refused and the stream is unchanged."""

    status = 409
    kind = "sequence"


class ShardUnavailable(ServeError):
    """The stream's shard did not come back within the retry window (it died and neither Ray nor
    the front has brought it back). Retriable: the same frame may be sent again."""

    status = 503
    retriable = True
    kind = "shard_unavailable"
    retry_after_s = 1.0


class ShardTimeout(ServeError):
    """The stream's shard did not answer within ``shard_timeout_s`` (hung or overloaded). The
    frame may still be computed there: send the same frame again (same sequence number) and the
    front asks the shard for that frame's result instead of computing it twice."""

    status = 503
    retriable = True
    kind = "shard_timeout"
    retry_after_s = 1.0


class Overloaded(ServeError):
    """The stream's shard has ``max_queue`` frames waiting; this frame was not queued and nothing
    changed. Send the same frame again after ``retry_after_s``."""

    status = 429
    retriable = True
    kind = "overloaded"
    retry_after_s = 0.5


class ComputeFailed(ServeError):
    """The engine failed on the batch that held this frame. The engine rolled the batch back:
    every stream of it keeps the state it had before this frame, and the frame's sequence number
    was not used, so the same frame may be sent again."""

    status = 500
    retriable = True
    kind = "compute_failed"


class ShuttingDown(ServeError):
    """The shard closed before this frame was computed (nothing changed for its stream)."""

    status = 503
    retriable = True
    kind = "shutting_down"
    retry_after_s = 1.0


class InternalError(ServeError):
    """A bug in the serving layer (the message names the exception)."""

    status = 500
    kind = "internal"


ERRORS = {cls.kind: cls for cls in (BadRequest, BadFrame, UnknownModel, UnknownStream, SequenceError,
                                    ShardUnavailable, ShardTimeout, Overloaded, ComputeFailed, ShuttingDown,
                                    InternalError)}


def from_dict(d: dict) -> ServeError:
    """The error :meth:`ServeError.to_dict` described (an :class:`InternalError` for unknown kinds)."""
    exc = ERRORS.get(d.get("error"), InternalError)(str(d.get("message", "")))
    if d.get("retry_after_s") is not None:
        exc.retry_after_s = float(d["retry_after_s"])
    return exc
