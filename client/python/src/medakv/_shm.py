"""The shared-memory data plane from Python (docs/shared_memory.md), used by ``Client`` for a server on this host.

A ``Pool`` keeps registered regions (POSIX shared-memory objects, each
registered with ``RegisterSharedMemory``, whose call stays open as the
lease) and lends one to a call that fits in it. The call copies its tensors
into the region and sends refs instead of bytes, and has its results
written into the region. A region returns to the pool after a call that
succeeded and is released after one that failed (the server may still touch
it for a moment). Registration refused for good (the server cannot see the
object or does not count this client as local) turns shared memory off for
the client; any other failure pauses it for 10 s. The rules are those of the
C++ client (docs/client.md, "Shared memory").
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import secrets
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Callable, List, Optional, Tuple

import grpc

from .v1 import medakv_pb2 as pb

_GRANULE = 1 << 20  # regions are whole MiB
_ALIGN = 64  # tensors start on 64-byte boundaries inside a region
_PAUSE_SECONDS = 10.0
_REGISTER_TIMEOUT = 10.0
_PERMANENT = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED,
              grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
_counter = itertools.count()

MODES = ("auto", "off", "always")


def align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _loopback_host(host: str) -> bool:
    host = host.strip()
    if host.startswith("[") and "]" in host:
        host = host[1:host.index("]")]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(address: str) -> str:
    if address.startswith("["):
        return address[: address.index("]") + 1] if "]" in address else address
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address  # a bare IPv6 address or a host without a port


def is_local_target(target: str) -> bool:
    """A target on this host: unix sockets, localhost, 127.0.0.0/8 and ::1 (as the server's default peers)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            addresses = target[len(scheme):]
            return bool(addresses) and all(_loopback_host(_host_of(a)) for a in addresses.split(","))
    if target.startswith("dns:"):
        target = target[len("dns:"):]
        if target.startswith("//"):
            slash = target.find("/", 2)
            if slash < 0:
                return False
            target = target[slash + 1:]
    return bool(target) and _loopback_host(_host_of(target))


class Region:
    """One registered shared-memory object: its mapping and its lease (the open RegisterSharedMemory call)."""

    def __init__(self, stub: Any, size: int, prefix: str, metadata: Tuple[Tuple[str, str], ...]) -> None:
        name = f"{prefix}{os.getpid()}-{next(_counter)}-{secrets.token_hex(8)}"
        # multiprocessing's resource tracker unlinks the object at exit if close() never ran.
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        self.name = name
        self.size = size
        self.call: Any = None
        try:
            # Commit the pages now: /dev/shm grows lazily, and a write into a page it has no room for would be a
            # SIGBUS in the middle of a copy.
            os.posix_fallocate(self.shm._fd, 0, size)  # type: ignore[attr-defined]
            self.call = stub.RegisterSharedMemory(
                pb.RegisterSharedMemoryRequest(region=name, shm_name="/" + name, size=size), metadata=metadata)
            _first_response(self.call, _REGISTER_TIMEOUT)
        except BaseException:
            self.close()
            raise

    @property
    def buf(self) -> memoryview:
        return self.shm.buf  # type: ignore[return-value]

    def ended(self) -> bool:
        """The lease is over (the server restarted or dropped the region)."""
        return self.call is None or self.call.done()

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
        try:
            self.shm.close()
        except BufferError:  # a view of the mapping is still alive; the object is unlinked all the same
            pass
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


def _first_response(call: Any, timeout: float) -> None:
    """Waits for the registration's answer (the lease's first message), at most ``timeout`` seconds."""
    done = threading.Event()
    error: List[BaseException] = []

    def read() -> None:
        try:
            next(call)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            error.append(e)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout):
        call.cancel()
        raise TimeoutError(f"RegisterSharedMemory did not answer in {timeout} s")
    if error:
        raise error[0]


class Pool:
    """Registered regions of one client, lent to one call at a time."""

    def __init__(self, stub: Any, metadata: Tuple[Tuple[str, str], ...], pool_bytes: int,
                 prefix: Callable[[], str]) -> None:
        self._stub = stub
        self._metadata = metadata
        self._pool_bytes = pool_bytes
        self._prefix = prefix
        self._lock = threading.Lock()
        self._idle: List[Region] = []
        self._retry_after = 0.0
        self.last_error: Optional[str] = None

    def borrow(self, size: int) -> Optional[Region]:
        """A region of at least ``size`` bytes, or None (the call then uses the socket)."""
        if size <= 0 or size > self._pool_bytes:
            return None
        ended: List[Region] = []
        with self._lock:
            if time.monotonic() < self._retry_after:
                return None
            ended = [r for r in self._idle if r.ended()]
            self._idle = [r for r in self._idle if not r.ended()]
            fits = [r for r in self._idle if r.size >= size]
            best = min(fits, key=lambda r: r.size) if fits else None
            if best is not None:
                self._idle.remove(best)
        for r in ended:
            r.close()
        if best is not None:
            return best
        try:
            return Region(self._stub, (size + _GRANULE - 1) // _GRANULE * _GRANULE, self._prefix(), self._metadata)
        except grpc.RpcError as e:
            permanent = e.code() in _PERMANENT
            self._pause(permanent, f"RegisterSharedMemory: {e.code().name}: {e.details()}")
        except (OSError, TimeoutError, ValueError) as e:  # /dev/shm full, no POSIX shared memory, no answer
            self._pause(False, f"shared memory: {e}")
        return None

    def give_back(self, region: Region, clean: bool) -> None:
        """After a call: into the pool when it succeeded and the pool has room, else released."""
        if clean and not region.ended():
            with self._lock:
                if sum(r.size for r in self._idle) + region.size <= self._pool_bytes:
                    self._idle.append(region)
                    return
        region.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for r in idle:
            r.close()

    def _pause(self, permanent: bool, why: str) -> None:
        with self._lock:
            self._retry_after = float("inf") if permanent else time.monotonic() + _PAUSE_SECONDS
            self.last_error = why
