"""Bearer tokens and tenants through the Python client (``token=``), and TLS with ``credentials=``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from conftest import random_cache
from test_compress import raw

import medakv

ALICE = "py-alice-token-0123456789"
BOB = "py-bob-token-0123456789abc"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# python tests\n{ALICE} alice\n{BOB} bob\n")
    return path


@pytest.fixture(scope="module")
def secured(start_server, tokens):
    return start_server(f"--auth_tokens_file={tokens}")


def test_without_or_with_a_wrong_token_every_call_is_unauthenticated(secured):
    for token in (None, "not-a-valid-token-0123456789"):
        with medakv.Client(secured.address, timeout=60, token=token) as c:
            assert c.health() == "SERVING"  # the health service needs no token
            for call in (lambda: c.stats(), lambda: c.list_caches(), lambda: c.get_cache("x"),
                         lambda: c.delete_cache("x"), lambda: c.put_cache("x", **random_cache(1, layers=1, tokens=8))):
                with pytest.raises(medakv.MedakvError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in e.value.details()
                if token is not None:
                    assert token not in e.value.details()


def test_tenants_see_only_their_own_caches(secured):
    a = random_cache(5, layers=2, tokens=32)
    b = random_cache(6, layers=2, tokens=32)
    with medakv.Client(secured.address, timeout=60, token=ALICE) as alice, \
            medakv.Client(secured.address, timeout=60, token=BOB) as bob:
        assert alice.stats().tenant == "alice" and bob.stats().tenant == "bob"
        alice.put_cache("py/shared", **a)
        alice.put_cache("py/alice-only", **a)
        bob.put_cache("py/shared", **b)
        with pytest.raises(medakv.MedakvError) as e:
            bob.get_cache("py/alice-only")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(medakv.MedakvError) as e:
            bob.delete_cache("py/alice-only")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert [c.cache_id for c in bob.list_caches("py/")] == ["py/shared"]
        assert [c.cache_id for c in alice.list_caches("py/")] == ["py/alice-only", "py/shared"]
        for who, cache in ((alice, a), (bob, b)):
            got = who.get_cache("py/shared")
            assert all(raw(r.key) == raw(k) for r, k in zip(got.layers, cache["keys"]))


def test_token_must_be_printable():
    for bad in ("", "has space", "tab\there", "é-unicode"):
        with pytest.raises(ValueError, match="token"):
            medakv.Client("127.0.0.1:1", token=bad)
    with pytest.raises(TypeError, match="token"):
        medakv.Client("127.0.0.1:1", token=b"bytes")  # type: ignore[arg-type]


def test_tls_with_credentials(start_server, tmp_path):
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-days", "2", "-subj", "/CN=py-ca", "-keyout", str(tmp_path / "ca.key"),
        "-out", str(tmp_path / "ca.pem"))
    run("req", *ec, "-subj", "/CN=localhost", "-keyout", str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.csr"))
    (tmp_path / "tls.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-days", "2", "-in", str(tmp_path / "tls.csr"), "-CA", str(tmp_path / "ca.pem"),
        "-CAkey", str(tmp_path / "ca.key"), "-CAcreateserial", "-extfile", str(tmp_path / "tls.ext"),
        "-out", str(tmp_path / "tls.pem"))
    s = start_server(f"--tls_cert={tmp_path / 'tls.pem'}", f"--tls_key={tmp_path / 'tls.key'}")
    creds = grpc.ssl_channel_credentials(root_certificates=(tmp_path / "ca.pem").read_bytes())
    with medakv.Client(s.address, timeout=60, credentials=creds) as c:
        assert c.stats().tenant == ""
        c.put_cache("tls", **random_cache(3, layers=1, tokens=16))
        assert c.get_cache("tls").info.cache_id == "tls"
    with medakv.Client(s.address, timeout=10) as plaintext:
        with pytest.raises(medakv.MedakvError) as e:
            plaintext.stats()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
