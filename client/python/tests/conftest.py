"""Fixtures: a real medakv-server process (CPU backend, port 0), the medakv CLI, and a fake server.

MEDAKV_SERVER and MEDAKV_CLI name the binaries (default: the repository's
build/service/server/medakv-server and build/client/cli/medakv). A missing
binary fails the tests that need it (it does not skip them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import grpc
import numpy as np
import pytest

import medakv
from medakv.v1 import medakv_pb2 as pb
from medakv.v1 import medakv_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _binary(env: str, default: str) -> Path:
    path = Path(os.environ.get(env) or REPO / default)
    if not path.is_file():
        pytest.fail(f"{path} not found: build it (cmake --build build --target medakv-server medakv) or set {env}",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def server_bin() -> Path:
    return _binary("MEDAKV_SERVER", "build/service/server/medakv-server")


@pytest.fixture(scope="session")
def cli_bin() -> Path:
    return _binary("MEDAKV_CLI", "build/client/cli/medakv")


class ServerProcess:
    """medakv-server on 127.0.0.1, a free port it picks (--listen=...:0), found in its log."""

    def __init__(self, binary: Path, log: Path, flags: List[str]) -> None:
        self.log = log
        args = [str(binary), "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--backend=cpu",
                "--shutdown_grace=1s", *flags]
        env = dict(os.environ, OMP_WAIT_POLICY="passive")
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env)
        deadline = time.monotonic() + 20
        port = None
        while time.monotonic() < deadline:
            m = re.search(r"listening on port (\d+)", log.read_text(errors="replace"))
            if m:
                port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if port is None:
            self.stop()
            pytest.fail(f"medakv-server did not start: {log.read_text(errors='replace')}", pytrace=False)
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> Optional[str]:
        """SIGTERM, then wait; what went wrong, if anything (it must stop within its 1 s grace, exit status 0)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return f"medakv-server did not stop within 10 s of SIGTERM: {self.log.read_text(errors='replace')}"
        if self.proc.returncode != 0:
            return (f"medakv-server exited with status {self.proc.returncode}: "
                    f"{self.log.read_text(errors='replace')[-4000:]}")
        return None


@pytest.fixture(scope="session")
def start_server(server_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(*flags): a server with extra flags, stopped at the end of the session."""
    started: List[ServerProcess] = []

    def start(*flags: str) -> ServerProcess:
        s = ServerProcess(server_bin, tmp_path_factory.mktemp("server") / "server.err", list(flags))
        started.append(s)
        return s

    yield start
    # A server that crashed, leaked (sanitizer builds) or hung on shutdown fails the run.
    problems = [p for p in (s.stop() for s in started) if p]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[medakv.Client]:
    with medakv.Client(server.address, timeout=120) as c:
        yield c


# ---- a fake server: records what arrives, answers as told ------------------------------------------


class FakeMedakv(pb_grpc.MedakvServicer):
    """Counts every call; Compress answers with `compress_responses` (or fails with `compress_error`).

    PutCache keeps the headers it receives in `put_headers`.
    """

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.messages = 0
        self.put_headers: List[pb.PutCacheHeader] = []
        self.compress_responses: List[pb.CompressResponse] = []
        self.lock = threading.Lock()

    def _record(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)

    def Compress(self, request_iterator, context):  # noqa: N802 (gRPC's names)
        self._record("Compress")
        for _ in request_iterator:
            with self.lock:
                self.messages += 1
        yield from self.compress_responses

    def PutCache(self, request_iterator, context):  # noqa: N802
        self._record("PutCache")
        for request in request_iterator:
            if request.WhichOneof("msg") == "header":
                with self.lock:
                    self.put_headers.append(request.header)
        return pb.PutCacheResponse()

    def GetCache(self, request, context):  # noqa: N802
        self._record("GetCache")
        return iter(())

    def CompressCache(self, request, context):  # noqa: N802
        self._record("CompressCache")
        return pb.CompressCacheResponse()

    def DeleteCache(self, request, context):  # noqa: N802
        self._record("DeleteCache")
        return pb.DeleteCacheResponse()

    def ListCaches(self, request, context):  # noqa: N802
        self._record("ListCaches")
        return pb.ListCachesResponse()


@pytest.fixture()
def fake() -> Iterator[tuple]:
    """(FakeMedakv, its address): an in-process gRPC server on a free loopback port."""
    servicer = FakeMedakv()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_MedakvServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


# ---- random caches -----------------------------------------------------------------------------------


def to_wire(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the wire form of dtype (bfloat16: round to nearest even, as uint16 bits)."""
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "float32":
        return x.astype(np.float32)
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def random_cache(seed: int, *, layers: int = 3, kv_heads: int = 2, q_heads: int = 4, tokens: int = 97,
                 head_dim: int = 16, q_tokens: int = 5, dtype: str = "float16", layout: str = "hnd",
                 precomputed: bool = False, score_heads: Optional[int] = None) -> dict:
    """A cache in wire form: keys, values, queries (or scores + entropy), query_positions, modality flags."""
    rng = np.random.default_rng(seed)

    def dims(heads: int, n: int) -> tuple:
        return (heads, n, head_dim) if layout == "hnd" else (n, heads, head_dim)

    c: dict = {
        "keys": [to_wire(rng.standard_normal(dims(kv_heads, tokens)), dtype) for _ in range(layers)],
        "values": [to_wire(rng.standard_normal(dims(kv_heads, tokens)), dtype) for _ in range(layers)],
    }
    modality = np.zeros(tokens, dtype=np.uint8)
    modality[tokens // 10: tokens // 10 + tokens // 2] = 1
    modality[tokens - 9: tokens - 6] = 1
    c["modality"] = modality
    if precomputed:
        h = score_heads or kv_heads
        c["scores"] = [rng.random((h, tokens), dtype=np.float32) for _ in range(layers)]
        c["entropy"] = [float(np.float32(rng.uniform(1, 6))) for _ in range(layers)]
    else:
        c["queries"] = [to_wire(rng.standard_normal(dims(q_heads, q_tokens)) * 2, dtype) for _ in range(layers)]
        c["query_positions"] = [np.sort(rng.choice(tokens, q_tokens, replace=False)).astype(np.int32)
                                for _ in range(layers)]
    return c
