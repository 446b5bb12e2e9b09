"""Failed calls raise MedakvError carrying the gRPC status: from a real server, a dead address, and a fake
server whose answers break the protocol."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import random_cache

import medakv
from medakv.v1 import medakv_pb2 as pb


def small():
    return random_cache(30, layers=2, tokens=50, q_tokens=4, dtype="float16")


def test_unreachable_server_is_unavailable():
    with medakv.Client("127.0.0.1:1", timeout=10) as client:
        with pytest.raises(medakv.MedakvError) as e:
            client.compress(**small())
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert str(e.value).startswith("cannot reach server 127.0.0.1:1: UNAVAILABLE: ")
        assert e.value.method == "Compress" and e.value.target == "127.0.0.1:1"
        assert isinstance(e.value, grpc.RpcError)
        with pytest.raises(medakv.MedakvError, match="cannot reach server 127.0.0.1:1: UNAVAILABLE"):
            client.health(timeout=5)


def test_deadline_exceeded(client, server):
    with pytest.raises(medakv.MedakvError) as e:
        client.compress(**small(), timeout=1e-6)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(e.value).startswith(f"server {server.address}: DEADLINE_EXCEEDED: ")


def test_server_limits_come_back_as_resource_exhausted(start_server):
    s = start_server("--max_request_bytes=20000")
    with medakv.Client(s.address, timeout=60) as client:
        with pytest.raises(medakv.MedakvError) as e:
            client.compress(**random_cache(31, layers=2, tokens=400, dtype="float32"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_request_bytes" in e.value.details()


def test_chunk_over_the_message_limit_says_what_to_change(start_server):
    s = start_server("--max_message_bytes=65536")
    cache = random_cache(32, layers=1, kv_heads=1, q_heads=1, tokens=200, head_dim=128, dtype="float32")
    with medakv.Client(s.address, timeout=60, shared_memory="off") as client:
        with pytest.raises(medakv.MedakvError) as e:
            client.compress(**cache, chunk_bytes=100000)  # a 102400-byte key in one 100000-byte chunk
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "chunk_bytes must stay under the server's --max_message_bytes" in str(e.value)
        # The same cache in chunks under the limit goes through.
        result = client.compress(**cache, chunk_bytes=16384)
        assert result.layers[0].key.shape == (1, 40, 128)
    with medakv.Client(s.address, timeout=60) as client:  # through shared memory no message carries a tensor
        shared = client.compress(**cache, chunk_bytes=100000)
        assert shared.shared_memory and np.array_equal(shared.layers[0].key, result.layers[0].key)


def test_store_errors_carry_their_status(client):
    with pytest.raises(medakv.MedakvError) as e:
        client.get_cache("errors/no-such-cache")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "errors/no-such-cache" in e.value.details()
    with pytest.raises(medakv.MedakvError) as e:
        client.delete_cache("errors/no-such-cache")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    cache = small()
    kv = {"keys": cache["keys"], "values": cache["values"]}
    client.put_cache("errors/kv-only", **kv, overwrite=True)
    with pytest.raises(medakv.MedakvError) as e:
        client.put_cache("errors/kv-only", **kv)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert e.value.method == "PutCache"
    with pytest.raises(medakv.MedakvError) as e:
        client.compress_cache("errors/kv-only")  # stored without statistics
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(medakv.MedakvError) as e:
        client.get_cache("errors/kv-only", layer_begin=1, layer_end=5)  # the server knows the layer count
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layer range [1, 5)" in e.value.details()
    client.delete_cache("errors/kv-only")


# ---- answers that break the protocol (a fake server) ------------------------------------------------


def info(layer, budget):
    return pb.CompressResponse(layer=pb.LayerInfo(layer=layer, budget=budget, entropy=1.0, alpha=0.5))


def chunk(layer, kind, offset, data=None, shm=False):
    c = pb.TensorChunk(layer=layer, tensor=kind, offset=offset)
    if shm:
        c.shm.region = "r"
    else:
        c.data = data
    return pb.CompressResponse(chunk=c)


SUMMARY = pb.CompressResponse(summary=pb.CompressSummary(tokens_in=100, tokens_kept=2))
KEY, VALUE, POS = pb.TENSOR_KIND_KEY, pb.TENSOR_KIND_VALUE, pb.TENSOR_KIND_POSITIONS
ROW = 2 * 16 * 2  # kv_heads * head_dim * 2 bytes per kept token


def whole_layer(layer, budget=1):
    return [info(layer, budget), chunk(layer, KEY, 0, b"\0" * ROW * budget), chunk(layer, VALUE, 0, b"\0" * ROW * budget),
            chunk(layer, POS, 0, b"\0" * 8 * budget)]


@pytest.mark.parametrize("responses,fragment", [
    ([info(0, 51)], "server sent layer 0's budget 51, outside [1, tokens=50]"),
    ([info(2, 1)], "server sent a layer info for layer 2, outside the layers asked for [0, 2)"),
    ([info(0, 1), info(0, 1)], "server sent layer 0's info twice"),
    ([chunk(0, KEY, 0, b"x")], "server sent a chunk of layer 0 tensor 1 before that layer's info"),
    ([info(0, 1), chunk(0, KEY, 4, b"x")], "server sent an out-of-order chunk of layer 0's key (offset 4"),
    ([info(0, 1), chunk(0, KEY, 0, b"x" * (ROW + 1))], "server sent an out-of-order chunk of layer 0's key"),
    ([info(0, 1), chunk(0, POS, 0, shm=True)], "which this client did not ask for"),
    (whole_layer(0) + whole_layer(1), "server sent no summary at the end of the stream"),
    (whole_layer(0) + [SUMMARY], "server sent no info for layer 1"),
    (whole_layer(0) + whole_layer(1)[:3] + [SUMMARY], "server sent 0 of the 8 bytes of layer 1's positions"),
])
def test_protocol_errors(fake, responses, fragment):
    servicer, address = fake
    servicer.compress_responses = responses
    with medakv.Client(address, timeout=30) as client:
        with pytest.raises(medakv.MedakvError) as e:
            client.compress(**small())
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert fragment in e.value.details()


def test_fake_answer_that_keeps_the_protocol_is_accepted(fake):
    servicer, address = fake
    servicer.compress_responses = whole_layer(0, budget=2) + whole_layer(1) + [SUMMARY]
    with medakv.Client(address, timeout=30) as client:
        result = client.compress(**small())
    assert [r.budget for r in result.layers] == [2, 1]
    assert result.layers[0].key.shape == (2, 2, 16)
