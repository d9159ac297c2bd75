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

    def to_dict(self) -> dict:
        return {"error": self.kind, "message": self.message, "retriable": self.retriable, "status": self.status}


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
    """The stream's shard did not come back within the retry window (it died and Ray has not
    restarted it, or it ran out of restarts). Retriable: the same frame may be sent again."""

    status = 503
    retriable = True
    kind = "shard_unavailable"


class InternalError(ServeError):
    """The engine failed on a batch; the streams of that batch restart with a dense frame."""

    status = 500
    kind = "internal"


ERRORS = {cls.kind: cls for cls in (BadRequest, BadFrame, UnknownModel, UnknownStream, SequenceError,
                                    ShardUnavailable, InternalError)}


def from_dict(d: dict) -> ServeError:
    """The error :meth:`ServeError.to_dict` described (an :class:`InternalError` for unknown kinds)."""
    return ERRORS.get(d.get("error"), InternalError)(str(d.get("message", "")))
