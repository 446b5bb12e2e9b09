"""Bad arguments raise ValueError or TypeError with a clear message, before anything is sent.

The client talks to a fake in-process server that records every call: after
each bad call it must have seen none.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict

import numpy as np
import pytest
from conftest import random_cache

import medakv
from medakv.v1 import medakv_pb2 as pb


def good() -> Dict[str, Any]:
    return random_cache(20, layers=2, tokens=40, q_tokens=4, dtype="float16")


def with_(**changes: Any) -> Dict[str, Any]:
    c = good()
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v(c) if callable(v) else v
    return c


COMPRESS_CASES = [
    # (id, kwargs, exception, message fragment)
    ("keys not a list", with_(keys={"a": 1}), TypeError, "keys: expected a list of per-layer tensors"),
    ("keys empty", with_(keys=[], values=[]), ValueError, "keys: the cache has no layer"),
    ("keys 2-D", with_(keys=lambda c: [k[0] for k in c["keys"]]), ValueError, "keys[0]: shape (40, 16) is not 3-D"),
    ("stacked keys 3-D", with_(keys=lambda c: c["keys"][0]), ValueError, "a single tensor must be 4-D"),
    ("keys of lists", with_(keys=lambda c: [k.tolist() for k in c["keys"]]), TypeError,
     "keys[0]: expected a numpy.ndarray or torch.Tensor, got list"),
    ("float64 keys", with_(keys=lambda c: [k.astype(np.float64) for k in c["keys"]]), TypeError,
     "keys[0]: dtype float64 is not supported"),
    ("int keys", with_(keys=lambda c: [k.astype(np.int32) for k in c["keys"]]), TypeError,
     "keys[0]: dtype int32 is not supported"),
    ("values count", with_(values=lambda c: c["values"][:1]), ValueError, "values: 1 layers, but keys has 2"),
    ("values dtype", with_(values=lambda c: [v.astype(np.float32) for v in c["values"]]), TypeError,
     "values[0]: dtype float32 differs from keys[0] (float16)"),
    ("layer shape", with_(values=lambda c: [c["values"][0], c["values"][1][:, :39]]), ValueError,
     "values[1]: shape (2, 39, 16) differs from keys[0] (2, 40, 16)"),
    ("zero tokens", with_(keys=lambda c: [k[:, :0] for k in c["keys"]], values=lambda c: [v[:, :0] for v in c["values"]]),
     ValueError, "keys[0]: tokens is 0, must be > 0"),
    ("too many heads", with_(keys=[np.zeros((4097, 1, 1), np.float16)] * 2, values=[np.zeros((4097, 1, 1), np.float16)] * 2,
                             queries=None, query_positions=None, modality=None, scores=[np.zeros((4097, 1), np.float32)] * 2,
                             entropy=[1.0, 1.0]), ValueError, "kv_heads is 4097, over the server's limit of 4096"),
    ("queries dtype", with_(queries=lambda c: [q.astype(np.float32) for q in c["queries"]]), TypeError,
     "queries[0]: dtype float32 differs from the keys' (float16)"),
    ("q_heads not a multiple", with_(queries=lambda c: [q[:3] for q in c["queries"]]), ValueError,
     "queries[0]: 3 query heads, expected a positive multiple of kv_heads (2)"),
    ("q head_dim", with_(queries=lambda c: [q[:, :, :8] for q in c["queries"]]), ValueError,
     "queries[0]: head_dim 8 differs from the keys' (16)"),
    ("q_tokens > tokens without positions", with_(queries=lambda c: [np.zeros((4, 41, 16), np.float16)] * 2,
                                                   query_positions=None),
     ValueError, "queries[0]: 41 query rows for 40 tokens: rows after the cache (probes) need query_positions"),
    ("q_tokens over the limit", with_(queries=lambda c: [np.zeros((4, 65617, 16), np.float16)] * 2,
                                      query_positions=None),
     ValueError, "queries[0]: q_tokens must be in [1, 2 x tokens + 65536 = 65616], got 65617"),
    ("query count", with_(queries=lambda c: c["queries"][:1]), ValueError, "queries: 1 layers, but keys has 2"),
    ("query shapes differ", with_(queries=lambda c: [c["queries"][0], c["queries"][1][:, :3]], query_positions=None),
     ValueError, "queries[1]: shape (4, 3, 16) differs from queries[0] (4, 4, 16)"),
    ("position out of range", with_(query_positions=[np.array([0, 1, 2, 2 * 40 + 65536])] * 2), ValueError,
     "query_positions[0][3] is 65616, outside [0, 2 x tokens + 65536 = 65616)"),
    ("negative position", with_(query_positions=[0, -1, 2, 3]), ValueError, "query_positions[0][1] is -1"),
    ("positions length", with_(query_positions=np.arange(3)), ValueError,
     "query_positions[0]: shape (3,), expected [q_tokens=4]"),
    ("outside lse shape", with_(query_outside_lse=[np.zeros((4, 3), np.float32)] * 2), ValueError,
     "query_outside_lse[0]: shape (4, 3), expected [q_heads=4, q_tokens=4]"),
    ("outside lse NaN", with_(query_outside_lse=lambda c: [np.zeros((4, 4), np.float32),
                                                          np.where(np.eye(4) > 0, np.nan, 0).astype(np.float32)]),
     ValueError, "query_outside_lse[1][0, 0] is nan (expected finite, or -inf for a row"),
    ("outside lse +inf", with_(query_outside_lse=[np.full((4, 4), np.inf, np.float32)] * 2), ValueError,
     "query_outside_lse[0][0, 0] is inf"),
    ("outside lse layers", with_(query_outside_lse=[np.zeros((4, 4), np.float32)]), ValueError,
     "query_outside_lse: 1 layers, but keys has 2"),
    ("outside lse with scores", with_(queries=None, query_positions=None, query_outside_lse=[np.zeros((4, 4))] * 2,
                                      scores=[np.zeros((2, 40), np.float32)] * 2, entropy=[1.0, 1.0]), ValueError,
     "query_positions and query_outside_lse go with queries"),
    ("float positions", with_(query_positions=np.arange(4.0)), TypeError,
     "query_positions[0]: dtype float64 is not an integer type"),
    ("queries and scores", with_(scores=[np.zeros((2, 40), np.float32)] * 2), ValueError,
     "give either queries (the server computes the statistics) or scores and entropy"),
    ("entropy with queries", with_(entropy=[1.0, 2.0]), ValueError, "entropy goes with precomputed scores"),
    ("scores without entropy", with_(queries=None, query_positions=None, scores=[np.zeros((2, 40), np.float32)] * 2),
     ValueError, "scores need entropy"),
    ("entropy NaN", with_(queries=None, query_positions=None, scores=[np.zeros((2, 40), np.float32)] * 2,
                          entropy=[1.0, float("nan")]), ValueError, "entropy[1] is not finite"),
    ("entropy count", with_(queries=None, query_positions=None, scores=[np.zeros((2, 40), np.float32)] * 2,
                            entropy=[1.0]), ValueError, "entropy: 1 values, but keys has 2 layers"),
    ("score heads", with_(queries=None, query_positions=None, scores=[np.zeros((3, 40), np.float32)] * 2,
                          entropy=[1.0, 1.0]), ValueError, "scores[0]: 3 heads, expected kv_heads (2)"),
    ("score tokens", with_(queries=None, query_positions=None, scores=[np.zeros((2, 39), np.float32)] * 2,
                           entropy=[1.0, 1.0]), ValueError, "scores[0]: shape (2, 39), expected [score_heads, tokens=40]"),
    ("int scores", with_(queries=None, query_positions=None, scores=[np.zeros((2, 40), np.int32)] * 2,
                         entropy=[1.0, 1.0]), TypeError, "scores[0]: dtype int32 is not a floating type"),
    ("positions with scores", with_(queries=None, scores=[np.zeros((2, 40), np.float32)] * 2, entropy=[1.0, 1.0]),
     ValueError, "query_positions and query_outside_lse go with queries"),
    ("no statistics", with_(queries=None, query_positions=None), ValueError, "compress needs attention statistics"),
    ("modality length", with_(modality=np.zeros(39, np.uint8)), ValueError,
     "modality: per-token flags must be 1-D with one entry per token (40)"),
    ("modality value", with_(modality=lambda c: np.where(np.arange(40) == 7, 2, 0)), ValueError,
     "modality[7] is 2 (expected 0 for text or 1 for visual)"),
    ("float modality", with_(modality=np.zeros(40, np.float32)), TypeError, "per-token flags must be bool or integer"),
    ("span overlap", with_(modality=[(0, 10), (5, 3)]), ValueError,
     "modality[1] (start 5, length 3) overlaps modality[0] (start 0, length 10)"),
    ("span past end", with_(modality=[(30, 11)]), ValueError, "modality[0] (start 30, length 11) runs past tokens=40"),
    ("span length", with_(modality=[(3, 0)]), ValueError, "modality[0].length must be > 0, got 0"),
    ("span start", with_(modality=[(40, 1)]), ValueError, "modality[0].start must be in [0, tokens=40), got 40"),
    ("span kind", with_(modality=[(1, 2, "audio")]), ValueError, "modality[0].modality: expected 'visual' or 'text'"),
    ("modality type", with_(modality="visual"), TypeError, "modality: expected per-token flags"),
]


@pytest.mark.parametrize("kwargs,exc,fragment", [c[1:] for c in COMPRESS_CASES], ids=[c[0] for c in COMPRESS_CASES])
def test_bad_cache_is_refused_before_sending(fake, kwargs, exc, fragment):
    servicer, address = fake
    with medakv.Client(address) as client:
        with pytest.raises(exc, match=re.escape(fragment)):
            client.compress(**kwargs)
    assert servicer.calls == []


POLICY_CASES = [
    ("unknown policy", dict(policy="snapkv2"), ValueError,
     "unknown policy 'snapkv2' (expected one of: full, meda, streaming_llm, h2o, snapkv, pyramidkv, look_m, amber)"),
    ("policy type", dict(policy=3), TypeError, "policy: expected a str"),
    ("rho 0", dict(rho=0), ValueError, "rho must be in (0, 1], got 0"),
    ("rho 1.5", dict(rho=1.5), ValueError, "rho must be in (0, 1], got 1.5"),
    ("rho nan", dict(rho=float("nan")), ValueError, "rho must be in (0, 1]"),
    ("rho str", dict(rho="0.2"), TypeError, "rho: expected a number, got str"),
    ("unknown option", dict(foo=1), TypeError, "compress() got an unexpected keyword argument 'foo'"),
    ("option of another policy", dict(window=2), ValueError,
     "option 'window' does not apply to policy 'amber' (it is an option of snapkv, pyramidkv)"),
    ("option of another policy, meda", dict(policy="meda", sinks=2), ValueError,
     "option 'sinks' does not apply to policy 'meda' (it is an option of streaming_llm, amber)"),
    ("option of full", dict(policy="full", merge="average"), ValueError,
     "option 'merge' does not apply to policy 'full'"),
    ("tau", dict(tau=0.0), ValueError, "tau must be in [1e-06, 1e+06], got 0.0"),
    ("tau inf", dict(tau=float("inf")), ValueError, "tau must be in [1e-06, 1e+06]"),
    ("tau denormal", dict(tau=5e-324), ValueError, "tau must be in [1e-06, 1e+06], got 5e-324"),
    ("alpha_min", dict(alpha_min=-0.1), ValueError, "alpha_min must be in [0, 1], got -0.1"),
    ("alpha_max", dict(alpha_max=0), ValueError, "alpha_max must be in (0, 1], got 0"),
    ("alpha order", dict(alpha_min=0.5, alpha_max=0.25), ValueError,
     "alpha_min (0.5) must not exceed alpha_max (0.25)"),
    ("alpha order default", dict(alpha_max=0.005), ValueError,
     "alpha_min (0.01, the default) must not exceed alpha_max (0.005)"),
    ("exact_total int", dict(policy="meda", exact_total=1), TypeError, "exact_total: expected a bool, got int"),
    ("entropy_heads", dict(entropy_heads="max"), ValueError,
     "unknown entropy_heads 'max' (expected one of: mean_attention, mean_entropy)"),
    ("entropy_source", dict(entropy_source="visual"), ValueError, "unknown entropy_source 'visual'"),
    ("recent_fraction", dict(recent_fraction=1.5), ValueError, "recent_fraction must be in [0, 1], got 1.5"),
    ("text_prior", dict(text_prior="all"), ValueError, "unknown text_prior 'all'"),
    ("merge", dict(merge="median"), ValueError,
     "unknown merge 'median' (expected one of: average, pivotal, weighted, none)"),
    ("merge_threshold", dict(merge_threshold="max"), ValueError, "unknown merge_threshold 'max'"),
    ("merge type", dict(merge=1), TypeError, "merge: expected a str"),
    ("scale", dict(scale=-1.0), ValueError, "scale must be in [0, 10000]"),
    ("scale too big for float32", dict(scale=1e39), ValueError, "scale must be in [0, 10000]"),
    ("scale near float32 max", dict(scale=3e38), ValueError, "scale must be in [0, 10000] (0: 1/sqrt(head_dim)), got 3e+38"),
    ("sinks", dict(policy="streaming_llm", sinks=-1), ValueError, "sinks must be in [0, 2147483647], got -1"),
    ("sinks float", dict(policy="streaming_llm", sinks=2.0), TypeError, "sinks: expected an int, got float"),
    ("window", dict(policy="snapkv", window=0), ValueError, "window must be in [1, 2147483647], got 0"),
    ("pool_kernel", dict(policy="snapkv", pool_kernel=4), ValueError, "pool_kernel must be odd"),
    ("pool_kernel huge", dict(policy="snapkv", pool_kernel=2**31 - 1), ValueError,
     "pool_kernel must be odd and in [1, 1023], got 2147483647"),
    ("pyramid_beta", dict(policy="pyramidkv", pyramid_beta=-2), ValueError, "pyramid_beta must be in [0.001, 1e+06]"),
    ("pyramid_beta denormal", dict(policy="pyramidkv", pyramid_beta=5e-324), ValueError,
     "pyramid_beta must be in [0.001, 1e+06], got 5e-324"),
    ("timeout 0", dict(timeout=0), ValueError, "timeout must be > 0 seconds"),
    ("timeout str", dict(timeout="5"), TypeError, "timeout: expected seconds as a number"),
    ("chunk_bytes", dict(chunk_bytes=0), ValueError, "chunk_bytes must be > 0, got 0"),
    ("response_chunk_bytes", dict(response_chunk_bytes=100), ValueError,
     "response_chunk_bytes must be in [1024, 67108864] (0: the server's default), got 100"),
    ("layout", dict(layout="thd"), ValueError, "layout: expected 'hnd'"),
    ("amber layer_budget", dict(policy="amber", layer_budget="max"), ValueError,
     "unknown layer_budget 'max' (expected one of: uniform, mass, entropy, depth, global)"),
    ("amber depth_ratio", dict(policy="amber", depth_ratio=0.0), ValueError,
     "depth_ratio must be in [0.01, 100], got 0.0"),
    ("amber recent_search_rows", dict(policy="amber", recent_search_rows=-1), ValueError,
     "recent_search_rows must be in [0, 2147483647], got -1"),
    ("amber recent_search_rows type", dict(policy="amber", recent_search_rows=1.5), TypeError, "recent_search_rows"),
    ("amber score_norm", dict(policy="amber", score_norm=1), TypeError, "score_norm: expected a str"),
    ("score_norm of another policy", dict(policy="h2o", score_norm="sum"), ValueError,
     "option 'score_norm' does not apply to policy 'h2o' (it is an option of amber)"),
    ("amber sinks", dict(policy="amber", sinks=-2), ValueError, "sinks must be in [0, 2147483647], got -2"),
    ("amber tau", dict(policy="amber", tau=0.0), ValueError, "tau must be in [1e-06, 1e+06]"),
    ("preset with a policy", dict(policy="amber", preset="soft"), ValueError,
     "preset 'soft' selects the server's policy: pass policy=None with it (got policy='amber')"),
    ("preset with an option", dict(policy=None, preset="soft", tau=2.0), ValueError,
     "tau cannot be given with it (only rho can)"),
    ("preset name", dict(policy=None, preset="Soft"), ValueError, "preset 'Soft': names are 1-64 characters"),
    ("preset none", dict(policy=None, preset="none"), ValueError, "and not 'none'"),
    ("preset too long", dict(policy=None, preset="a" * 65), ValueError, "names are 1-64 characters"),
    ("preset type", dict(policy=None, preset=3), TypeError, "preset: expected a str, got int"),
    ("preset rho", dict(policy=None, preset="soft", rho=0.0), ValueError, "rho must be in (0, 1], got 0.0"),
]


@pytest.mark.parametrize("kwargs,exc,fragment", [c[1:] for c in POLICY_CASES], ids=[c[0] for c in POLICY_CASES])
def test_bad_policy_or_call_option_is_refused_before_sending(fake, kwargs, exc, fragment):
    servicer, address = fake
    with medakv.Client(address) as client:
        with pytest.raises(exc, match=re.escape(fragment)):
            client.compress(**good(), **kwargs)
    assert servicer.calls == []


def test_preset_messages():
    assert medakv.build_policy(None, None, preset="soft") == pb.Policy(preset="soft", rho=0.0)
    assert medakv.build_policy(None, 0.5, preset="a.b-c_9") == pb.Policy(preset="a.b-c_9", rho=0.5)
    # Options given as None are not given.
    assert medakv.build_policy(None, None, {"tau": None}, preset="soft") == pb.Policy(preset="soft")
    # No preset and no option: no policy kind, the server's default; with options, policy None is amber.
    assert medakv.build_policy(None, None) == pb.Policy() == medakv.build_policy()
    assert medakv.build_policy(None, 0.3) == pb.Policy(rho=0.3)
    assert medakv.build_policy(None, None, {"sinks": 2}) == medakv.build_policy("amber", 0.2, {"sinks": 2})
    with pytest.raises(ValueError, match="rho"):
        medakv.build_policy(None, 1.5)


def test_options_given_as_none_keep_the_defaults():
    assert medakv.build_policy("meda", 0.2, {"tau": None, "sinks": None}) == medakv.build_policy("meda", 0.2)
    # Names are case-insensitive, '-' and '_' alike, as on the command line.
    p = medakv.build_policy("Look-M", 0.5, {"merge": "Weighted", "text_prior": "keep-all-text"})
    assert p.WhichOneof("kind") == "look_m"
    assert p.look_m.select.merge == medakv.v1.medakv_pb2.MERGE_MODE_WEIGHTED
    assert not p.look_m.select.HasField("recent_fraction")  # left to the policy's default


STORE_CASES: list = [
    ("cache_id chars", lambda c: c.put_cache("a b", **good()), ValueError,
     "cache_id must be 1-256 characters of [A-Za-z0-9._:/-], got 'a b'"),
    ("cache_id empty", lambda c: c.get_cache(""), ValueError, "cache_id must be 1-256 characters"),
    ("cache_id long", lambda c: c.delete_cache("x" * 257), ValueError, "cache_id must be 1-256 characters"),
    ("cache_id type", lambda c: c.compress_cache(7), TypeError, "cache_id: expected a str, got int"),
    ("ttl", lambda c: c.put_cache("a", **good(), ttl_seconds=-1), ValueError, "ttl_seconds must be >= 0"),
    ("ttl float", lambda c: c.put_cache("a", **good(), ttl_seconds=1.5), TypeError, "ttl_seconds: expected an int"),
    ("overwrite", lambda c: c.put_cache("a", **good(), overwrite="yes"), TypeError, "overwrite: expected a bool"),
    ("tier", lambda c: c.put_cache("a", **good(), tier="gpu"), ValueError,
     "tier: expected 'auto', 'host' or 'device', got 'gpu'"),
    ("tier empty", lambda c: c.put_cache("a", **good(), tier=""), ValueError,
     "tier: expected 'auto', 'host' or 'device', got ''"),
    ("tier type", lambda c: c.put_cache("a", **good(), tier=pb.CACHE_TIER_HOST), TypeError,
     "tier: expected a str ('auto', 'host' or 'device'), got int"),
    ("tier none", lambda c: c.put_cache("a", **good(), tier=None), TypeError,
     "tier: expected a str ('auto', 'host' or 'device'), got NoneType"),
    ("put bad keys", lambda c: c.put_cache("a", keys=[np.zeros((2, 3), np.float16)], values=[np.zeros((2, 3),
                                            np.float16)]), ValueError, "keys[0]: shape (2, 3) is not 3-D"),
    ("compress_cache option", lambda c: c.compress_cache("a", policy="h2o", window=3), ValueError,
     "option 'window' does not apply to policy 'h2o'"),
    ("compress_cache unknown option", lambda c: c.compress_cache("a", bogus=3), TypeError,
     "compress_cache() got an unexpected keyword argument 'bogus'"),
    ("layer range", lambda c: c.get_cache("a", layer_begin=2, layer_end=2), ValueError,
     "layer_end (2) must be > layer_begin (2)"),
    ("layer_begin", lambda c: c.get_cache("a", layer_begin=-1), ValueError, "layer_begin must be >= 0"),
    ("tensors", lambda c: c.get_cache("a", tensors="jax"), ValueError, "tensors: expected 'numpy' or 'torch'"),
    ("device without torch", lambda c: c.get_cache("a", device="cuda"), ValueError, "device goes with tensors='torch'"),
    ("list limit", lambda c: c.list_caches(limit=-1), ValueError, "limit must be in [0, 2147483647]"),
    ("list prefix", lambda c: c.list_caches(prefix=3), TypeError, "prefix: expected a str"),
]


@pytest.mark.parametrize("call,exc,fragment", [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES])
def test_bad_store_arguments_are_refused_before_sending(fake, call: Callable, exc, fragment):
    servicer, address = fake
    with medakv.Client(address) as client:
        with pytest.raises(exc, match=re.escape(fragment)):
            call(client)
    assert servicer.calls == []


@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(target=""), ValueError, "target: expected 'host:port'"),
    (dict(target="h:1", timeout=-1), ValueError, "timeout must be > 0 seconds"),
    (dict(target="h:1", chunk_bytes=-5), ValueError, "chunk_bytes must be > 0"),
    (dict(target="h:1", response_chunk_bytes=1 << 30), ValueError, "response_chunk_bytes must be in"),
    (dict(target="h:1", wait_for_ready=1), TypeError, "wait_for_ready: expected a bool"),
])
def test_bad_client_arguments(kwargs, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        medakv.Client(**kwargs)


@pytest.mark.parametrize("kwargs,want", [
    ({}, pb.CACHE_TIER_AUTO),
    (dict(tier="auto"), pb.CACHE_TIER_AUTO),
    (dict(tier="host"), pb.CACHE_TIER_HOST),
    (dict(tier="device"), pb.CACHE_TIER_DEVICE),
    (dict(tier=" Device "), pb.CACHE_TIER_DEVICE),  # as layout=: case and surrounding blanks do not matter
], ids=["default", "auto", "host", "device", "case"])
def test_put_cache_sends_the_tier(fake, kwargs, want):
    servicer, address = fake
    with medakv.Client(address, timeout=10) as client:
        client.put_cache("tier/a", **good(), overwrite=True, ttl_seconds=5, **kwargs)
    assert servicer.calls == ["PutCache"]
    assert len(servicer.put_headers) == 1
    header = servicer.put_headers[0]
    assert header.tier == want
    assert (header.cache_id, header.overwrite, header.ttl_seconds) == ("tier/a", True, 5)


def test_a_good_request_reaches_the_fake(fake):
    # The other tests' "nothing was sent" means something: a good request does arrive.
    servicer, address = fake
    with medakv.Client(address, timeout=10) as client:
        with pytest.raises(medakv.MedakvError):  # the fake answers nothing: no summary
            client.compress(**good(), chunk_bytes=1000)
    assert servicer.calls == ["Compress"]
    assert servicer.messages > 10  # the header and the chunks
