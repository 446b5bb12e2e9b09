"""The cache store through the client: PutCache, GetCache, CompressCache, ListCaches, DeleteCache, Stats, health."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import random_cache
from test_compress import raw

import medakv
from medakv.v1 import medakv_pb2 as pb


@pytest.fixture(scope="module")
def store(start_server):
    """A server of its own, so that the entry counts below are this module's."""
    s = start_server()
    with medakv.Client(s.address, timeout=120) as c:
        yield c


def test_health(store):
    assert store.health() == "SERVING"


@pytest.mark.parametrize("dtype,layout", [("float16", "nhd"), ("bfloat16", "hnd"), ("float32", "hnd")])
def test_put_get_compress_get_delete(store, dtype, layout):
    cache = random_cache(40, layers=3, tokens=120, dtype=dtype, layout=layout)
    cache_id = f"store/{dtype}-{layout}"
    t0 = int(time.time() * 1000)
    info = store.put_cache(cache_id, **cache, layout=layout, ttl_seconds=3600)
    assert info.cache_id == cache_id and not info.compressed and info.policy == ""
    assert info.shape == medakv.CacheShape(layers=3, kv_heads=2, q_heads=4, head_dim=16, tokens=120, dtype=dtype,
                                           layout=layout, modality=(medakv.ModalitySpan(12, 60), medakv.ModalitySpan(111, 3)))
    assert info.layer_tokens == (120, 120, 120)
    assert info.tier == "host" and info.bytes > 0
    assert t0 - 5000 <= info.created_unix_ms <= t0 + 60000
    assert info.expires_unix_ms == pytest.approx(info.created_unix_ms + 3600 * 1000, abs=1000)

    # Stored as sent: every layer's keys and values, positions 0..T-1 per head.
    stored = store.get_cache(cache_id)
    assert stored.info == info
    assert [r.layer for r in stored.layers] == [0, 1, 2]
    for r, k, v in zip(stored.layers, cache["keys"], cache["values"]):
        assert r.budget == 120
        assert raw(r.key) == raw(k) and raw(r.value) == raw(v)
        assert np.array_equal(r.positions, np.tile(np.arange(120, dtype=np.int32), (2, 1)))

    # Compressed in place with the statistics it was stored with: the same as Compress.
    done = store.compress_cache(cache_id, policy="meda", rho=0.2, merge="weighted")
    assert done.info.compressed and done.info.policy == "meda"
    assert done.info.layer_tokens == tuple(layer.budget for layer in done.layers)
    assert sum(done.info.layer_tokens) == round(0.2 * 3 * 120) == done.summary.tokens_kept
    assert done.summary.backend == "cpu" and done.summary.bytes_out < done.summary.bytes_in
    direct = store.compress(**cache, layout=layout, policy="meda", rho=0.2, merge="weighted")
    fetched = store.get_cache(cache_id, response_chunk_bytes=1024)
    for got, want, layer in zip(fetched.layers, direct.layers, done.layers):
        assert (got.budget, got.entropy, got.alpha) == (want.budget, want.entropy, want.alpha)
        assert (got.budget, got.entropy, got.alpha) == (layer.budget, layer.entropy, layer.alpha)
        assert raw(got.key) == raw(want.key) and raw(got.value) == raw(want.value)
        assert raw(got.positions) == raw(want.positions)
    # A layer range.
    part = store.get_cache(cache_id, layer_begin=1, layer_end=3)
    assert [r.layer for r in part.layers] == [1, 2]
    assert raw(part.layers[0].key) == raw(direct.layers[1].key)
    assert [r.layer for r in store.get_cache(cache_id, layer_begin=2).layers] == [2]

    assert store.delete_cache(cache_id) == done.info.bytes
    with pytest.raises(medakv.MedakvError):
        store.get_cache(cache_id)


@pytest.mark.parametrize("tier", ["auto", "host"])
def test_put_cache_with_a_tier_lands_on_the_host_tier_of_a_cpu_server(store, tier):
    # The test server has no device tier: auto falls back to the host tier.
    cache = random_cache(43, layers=2, tokens=50, dtype="float16")
    cache_id = f"store/tier-{tier}"
    info = store.put_cache(cache_id, **cache, tier=tier)
    assert info.tier == "host"
    stored = store.get_cache(cache_id)
    assert stored.info.tier == "host"
    assert [raw(r.key) for r in stored.layers] == [raw(k) for k in cache["keys"]]
    assert store.delete_cache(cache_id) == info.bytes


def test_precomputed_statistics_are_kept_for_compress_cache(store):
    cache = random_cache(41, layers=2, tokens=90, dtype="float16", precomputed=True, score_heads=4)
    store.put_cache("store/precomputed", **cache)
    done = store.compress_cache("store/precomputed", policy="snapkv", rho=0.3, window=8)
    direct = store.compress(**cache, policy="snapkv", rho=0.3, window=8)
    assert [layer.budget for layer in done.layers] == [r.budget for r in direct.layers]
    fetched = store.get_cache("store/precomputed")
    assert [raw(r.key) for r in fetched.layers] == [raw(r.key) for r in direct.layers]
    store.delete_cache("store/precomputed")


def test_a_stored_reconstruction_pass_gets_its_own_default(store):
    """CompressCache naming no policy of an entry stored with more query rows than tokens: the reconstruction
    default (amber, max score, per-head budgets across layers), padded rows at position -1 stored and fetched."""
    cache = random_cache(42, dtype="float32", tokens=40)
    rng = np.random.default_rng(42)
    cache["queries"] = [(rng.standard_normal((4, 45, 16)) * 2).astype(np.float32) for _ in range(3)]
    cache["query_positions"] = [np.arange(40, 85, dtype=np.int32)] * 3
    store.put_cache("store/rebuild", **cache)
    done = store.compress_cache("store/rebuild", policy=None, rho=0.25)
    ran = done.summary.policy
    assert ran.WhichOneof("kind") == "amber" and ran.amber.layer_budget == pb.LAYER_BUDGET_GLOBAL
    direct = store.compress(**cache, policy=None, rho=0.25)
    fetched = store.get_cache("store/rebuild")
    assert [raw(r.positions) for r in fetched.layers] == [raw(r.positions) for r in direct.layers]
    assert [raw(r.key) for r in fetched.layers] == [raw(r.key) for r in direct.layers]
    kept = sum(int((np.asarray(r.positions) >= 0).sum()) for r in fetched.layers)
    assert kept == round(0.25 * 3 * 2 * 40)  # entries kept over every layer and head, padding aside
    store.delete_cache("store/rebuild")
    # Fewer rows than tokens, carrying the attention they give outside the cache: probes too, stored with
    # that attention (the same selection as a direct compression).
    probes = dict(cache, queries=[q[:, -30:] for q in cache["queries"]],
                  query_positions=[p[-30:] for p in cache["query_positions"]],
                  # half the rows attend almost only outside the cache, the others not at all
                  query_outside_lse=[np.where(np.arange(30) % 2 == 0, -np.inf, 12.0) * np.ones((4, 1), np.float32)
                                     for _ in range(3)])
    store.put_cache("store/probes", **probes)
    done = store.compress_cache("store/probes", policy=None, rho=0.25)
    assert done.summary.policy.amber.layer_budget == pb.LAYER_BUDGET_GLOBAL
    direct = store.compress(**probes, policy=None, rho=0.25)
    fetched = store.get_cache("store/probes")
    assert [raw(r.positions) for r in fetched.layers] == [raw(r.positions) for r in direct.layers]
    plain = store.compress(**{k: v for k, v in probes.items() if k != "query_outside_lse"}, policy="amber",
                           rho=0.25, score_norm="max", layer_budget="global", sinks=4, recent_search_rows=0,
                           recent_fraction=0.0)
    assert [raw(r.positions) for r in fetched.layers] != [raw(r.positions) for r in plain.layers]
    store.delete_cache("store/probes")


def test_overwrite_list_and_stats(store):
    kv = random_cache(42, layers=1, tokens=30)
    before = store.stats()
    host = {t.tier: t for t in before.tiers}["host"]
    assert host.capacity_bytes > 0 and before.backend == "cpu" and before.version
    a = store.put_cache("list/a", keys=kv["keys"], values=kv["values"])
    store.put_cache("list/b", keys=kv["keys"], values=kv["values"])
    store.put_cache("other/c", keys=kv["keys"], values=kv["values"])
    replaced = store.put_cache("list/a", **kv, overwrite=True)
    assert replaced.bytes > a.bytes  # now with its queries
    listed = store.list_caches("list/")
    assert sorted(c.cache_id for c in listed) == ["list/a", "list/b"]
    assert len(store.list_caches("list/", limit=1)) == 1
    after = store.stats()
    assert {t.tier: t for t in after.tiers}["host"].entries == host.entries + 3
    freed = sum(store.delete_cache(i) for i in ("list/a", "list/b", "other/c"))
    assert freed == sum(c.bytes for c in listed) + a.bytes
    assert {t.tier: t for t in store.stats().tiers}["host"].used_bytes == host.used_bytes


def test_get_cache_as_torch(store):
    torch = pytest.importorskip("torch")
    cache = random_cache(43, layers=1, tokens=20, dtype="bfloat16")
    store.put_cache("torch/a", **cache)
    got = store.get_cache("torch/a", tensors="torch")
    assert got.layers[0].key.dtype == torch.bfloat16 and got.layers[0].positions.dtype == torch.int32
    assert raw(got.layers[0].key) == raw(cache["keys"][0])
    store.delete_cache("torch/a")


def test_list_follows_the_servers_pages(store):
    """Entries with 60000 visual spans each make CacheInfo messages of ~0.5 MB: the server's pages end early
    (2 MiB), and list_caches follows them to return every entry, in id order."""
    tokens = 120_000
    keys = [np.zeros((1, tokens, 1), dtype=np.float16)]  # 1 layer, 1 kv head, head_dim 1
    modality = np.zeros(tokens, dtype=np.uint8)
    modality[::2] = 1  # 60000 visual runs
    ids = [f"pages/{i}" for i in range(6)]
    for i in ids:
        store.put_cache(i, keys=keys, values=keys, modality=modality)
    try:
        listed = store.list_caches("pages/")
        assert [c.cache_id for c in listed] == ids
        assert len(store.list_caches("pages/", limit=4)) == 4
        # One raw request: the first page stops before the byte bound, and says where to go on.
        raw_page = store._stub.ListCaches(pb.ListCachesRequest(prefix="pages/"), timeout=10)
        assert 0 < len(raw_page.caches) < len(ids)
        assert raw_page.next_page_token == raw_page.caches[-1].cache_id
        assert raw_page.ByteSize() <= (2 << 20) + 600_000
    finally:
        for i in ids:
            store.delete_cache(i)
