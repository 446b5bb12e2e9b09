"""The shared-memory data plane from Python: used by itself for a local server, equal to the socket, and falls back."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from conftest import random_cache
from test_compress import raw

import medakv
from medakv import _shm

ALICE = "py-shm-alice-token-0123456789"


def regions(client: medakv.Client, want: int, timeout: float = 10.0) -> int:
    """The server's registered regions, waiting up to ``timeout`` for the count to become ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        n = client.stats().shared_memory_regions
        if n == want or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["hnd", "nhd"])
def test_compress_through_shared_memory_equals_the_socket(server, dtype, layout):
    cache = random_cache(70, layers=3, tokens=301, dtype=dtype, layout=layout)
    with medakv.Client(server.address) as shared, medakv.Client(server.address, shared_memory="off") as socket:
        got = shared.compress(**cache, layout=layout, policy="meda", rho=0.3)
        want = socket.compress(**cache, layout=layout, policy="meda", rho=0.3)
    assert got.shared_memory and not want.shared_memory
    assert got.summary.bytes_in == want.summary.bytes_in and got.summary.bytes_out == want.summary.bytes_out
    for g, w in zip(got.layers, want.layers):
        assert g.budget == w.budget
        assert raw(g.key) == raw(w.key) and raw(g.value) == raw(w.value) and raw(g.positions) == raw(w.positions)


def test_torch_tensors_through_shared_memory(server):
    torch = pytest.importorskip("torch")
    cache = random_cache(71, layers=2, tokens=130, dtype="float32")
    tensors = {k: [torch.from_numpy(np.ascontiguousarray(x)) for x in cache[k]] for k in ("keys", "values", "queries")}
    with medakv.Client(server.address) as shared, medakv.Client(server.address, shared_memory="off") as socket:
        got = shared.compress(**tensors, query_positions=cache["query_positions"], rho=0.25)
        want = socket.compress(**tensors, query_positions=cache["query_positions"], rho=0.25)
    assert got.shared_memory and isinstance(got.layers[0].key, torch.Tensor)
    assert all(torch.equal(g.key, w.key) and torch.equal(g.value, w.value) for g, w in zip(got.layers, want.layers))


def test_one_region_serves_call_after_call_and_goes_with_the_client(start_server):
    s = start_server()
    client = medakv.Client(s.address)
    cache = random_cache(72, layers=2, tokens=200)
    first = client.compress(**cache, rho=0.5)
    second = client.compress(**cache, rho=0.5)
    assert first.shared_memory and second.shared_memory
    assert [raw(a.key) for a in first.layers] == [raw(b.key) for b in second.layers]
    assert regions(client, 1) == 1  # the first call's region, pooled and reused
    with medakv.Client(s.address, shared_memory="off") as observer:
        client.close()
        assert regions(observer, 0) == 0  # closing ends the lease


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_store_through_shared_memory(server, dtype):
    cache = random_cache(73, layers=3, tokens=150, dtype=dtype)
    with medakv.Client(server.address) as shared, medakv.Client(server.address, shared_memory="off") as socket:
        info = shared.put_cache(f"shm/put-{dtype}", **cache, overwrite=True)
        assert info.bytes > 0
        stored = shared.get_cache(f"shm/put-{dtype}")
        assert stored.shared_memory
        for layer, k, v in zip(stored.layers, cache["keys"], cache["values"]):
            assert raw(layer.key) == raw(k) and raw(layer.value) == raw(v)
        shared.compress_cache(f"shm/put-{dtype}", policy="h2o", rho=0.3)
        for begin, end in ((0, None), (1, 3), (2, 3)):
            got = shared.get_cache(f"shm/put-{dtype}", layer_begin=begin, layer_end=end)
            want = socket.get_cache(f"shm/put-{dtype}", layer_begin=begin, layer_end=end)
            assert got.shared_memory and not want.shared_memory
            assert [(r.layer, r.budget) for r in got.layers] == [(r.layer, r.budget) for r in want.layers]
            assert all(raw(g.key) == raw(w.key) and raw(g.value) == raw(w.value) and raw(g.positions) ==
                       raw(w.positions) for g, w in zip(got.layers, want.layers))
        with pytest.raises(medakv.MedakvError) as e:
            shared.get_cache(f"shm/put-{dtype}-missing")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert shared.stats().shared_memory_regions >= 1


def test_a_failed_call_releases_its_region_and_the_next_one_works(start_server):
    s = start_server("--max_request_bytes=20000")
    with medakv.Client(s.address, timeout=60) as client:
        with pytest.raises(medakv.MedakvError) as e:
            client.compress(**random_cache(74, layers=2, tokens=400, dtype="float32"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert regions(client, 0) == 0
        small = client.compress(**random_cache(75, layers=1, tokens=40), rho=0.5)
        assert small.shared_memory


def test_falls_back_to_the_socket(start_server):
    cache = random_cache(76, layers=2, tokens=120)
    off = start_server("--max_shm_regions=0")  # the server's data plane is off: registration is refused
    with medakv.Client(off.address) as client:
        first = client.compress(**cache, rho=0.5)
        assert not first.shared_memory
        assert client._shm is not None and client._shm.last_error is not None
        assert not client.compress(**cache, rho=0.5).shared_memory
    s = start_server()
    with medakv.Client(s.address, shared_memory_pool_bytes=1) as client:  # the call is larger than the pool
        assert not client.compress(**cache, rho=0.5).shared_memory
    with medakv.Client(s.address) as client:
        assert client.compress(**cache, rho=0.5).shared_memory
        assert [raw(a.key) for a in first.layers] == [raw(b.key) for b in client.compress(**cache, rho=0.5).layers]


def test_tenants_name_their_objects_with_their_prefix(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} alice\n")
    s = start_server(f"--auth_tokens_file={tokens}")
    with medakv.Client(s.address, token=ALICE) as client:
        result = client.compress(**random_cache(77, layers=1, tokens=60), rho=0.5)
        assert result.shared_memory
        assert client._shm_prefix().startswith("medakv:alice")


@pytest.mark.parametrize("target,local", [
    ("127.0.0.1:50051", True), ("localhost:1", True), ("127.8.9.1:2", True), ("[::1]:50051", True),
    ("ipv4:127.0.0.1:1,127.0.0.2:2", True), ("ipv6:[::1]:3", True), ("dns:///localhost:5", True),
    ("dns://8.8.8.8/localhost:5", True), ("unix:/tmp/s.sock", True), ("unix-abstract:medakv", True),
    ("10.0.0.1:50051", False), ("example.com:443", False), ("ipv4:127.0.0.1:1,10.0.0.2:2", False),
    ("dns:///example.com:5", False), ("[::2]:1", False), ("", False),
])
def test_which_targets_are_on_this_host(target, local):
    assert _shm.is_local_target(target) is local


def test_argument_errors():
    with pytest.raises(ValueError, match="shared_memory: expected one of auto, off, always"):
        medakv.Client("127.0.0.1:1", shared_memory="yes")
    with pytest.raises(ValueError, match="shared_memory_pool_bytes"):
        medakv.Client("127.0.0.1:1", shared_memory_pool_bytes=-1)
    assert medakv.Client("10.0.0.1:1")._shm is None
    assert medakv.Client("10.0.0.1:1", shared_memory="always")._shm is not None
    assert medakv.Client("127.0.0.1:1", shared_memory="off")._shm is None
