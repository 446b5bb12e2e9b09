"""The exception a failed call raises."""

from __future__ import annotations

import grpc

__all__ = ["MedakvError"]


class MedakvError(grpc.RpcError):
    """A call to the server failed, or the server's answer broke the protocol.

    Carries the gRPC status like a ``grpc.Call``: ``code()`` is the
    ``grpc.StatusCode`` (``INVALID_ARGUMENT`` with the server's message naming
    the field, ``NOT_FOUND`` for an unknown cache id, ``RESOURCE_EXHAUSTED``,
    ``DEADLINE_EXCEEDED`` after ``timeout``, ``UNAVAILABLE`` when the server
    cannot be reached, ...) and ``details()`` the message. An answer that
    breaks the protocol (a chunk outside its tensor, a missing summary) is
    ``INTERNAL`` with a message starting "server sent". ``str(error)`` is one
    line, e.g. ``server 127.0.0.1:50051: INVALID_ARGUMENT: policy.rho must be
    in (0, 1] ...``.

    Arguments that are wrong before anything is sent raise ``ValueError`` or
    ``TypeError`` instead, never this.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, target: str = "", method: str = "") -> None:
        super().__init__(code, details)
        self._code = code
        self._details = details
        #: The server's address, as given to ``Client``.
        self.target = target
        #: The RPC that failed, e.g. ``"Compress"``.
        self.method = method

    def code(self) -> grpc.StatusCode:
        """The gRPC status code."""
        return self._code

    def details(self) -> str:
        """The status message (from the server, or the client's own for protocol errors)."""
        return self._details

    def __str__(self) -> str:
        where = f"cannot reach server {self.target}" if self._code == grpc.StatusCode.UNAVAILABLE else (
            f"server {self.target}")
        details = " ".join(self._details.split("\n"))
        return f"{where}: {self._code.name}: {details}"

    def __repr__(self) -> str:
        return f"MedakvError({self._code}, {self._details!r}, target={self.target!r}, method={self.method!r})"
