"""Client.compress against a real server equals `medakv compress` (the C++ library, CPU) bit for bit.

Each test writes the same cache as a medakv cache file, compresses it locally
with the CLI, and compares the CLI's output file with the Python client's
result: every byte of every key, value and positions tensor, the budgets,
and the float32 bits of entropy and alpha.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any, Dict

import grpc
import numpy as np
import pytest
from cache_file import FILE_DTYPE, read, write_cache
from conftest import random_cache, to_wire

import medakv
from medakv.v1 import medakv_pb2 as pb


def cli_compress(cli: Path, tmp_path: Path, cache: Dict[str, Any], dtype: str, layout: str, policy: str,
                 rho: float, options: Dict[str, Any]) -> Dict[str, Any]:
    """`medakv compress` on the cache written as a file; the output file's tensors."""
    source, output = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_cache(source, dtype, cache["keys"], cache["values"], queries=cache.get("queries"),
                query_positions=cache.get("query_positions"), query_outside_lse=cache.get("query_outside_lse"),
                scores=cache.get("scores"),
                entropy=cache.get("entropy"), modality=cache.get("modality"))
    # --local: the tests' $MEDAKV_SERVER names the server binary, and `medakv
    # compress` would take it for the servers to compress on.
    args = [str(cli), "compress", str(source), "-o", str(output), "--local", "--layout", layout, "--policy", policy,
            "--rho", repr(rho)]
    for name, value in options.items():
        flag = "--" + ("pyramid-beta" if name == "pyramid_beta" else name.replace("_", "-"))
        args += [f"{flag}={'true' if value else 'false'}"] if isinstance(value, bool) else [flag, str(value)]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return read(output)[0]


def raw(x: Any) -> bytes:
    """The bytes of a result tensor (NumPy or torch)."""
    if not isinstance(x, np.ndarray):  # torch
        import torch

        x = x.cpu()
        x = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()
    return np.ascontiguousarray(x).tobytes()


def assert_same(result: medakv.CompressResult, tensors: Dict[str, Any], dtype: str) -> None:
    layers = len(result.layers)
    want = {f"layer.{l}.{n}" for l in range(layers) for n in ("key", "value", "positions", "entropy", "alpha",
                                                                "budget")}
    assert set(tensors) == want
    assert result.dtype == dtype
    for l, r in enumerate(result.layers):
        assert r.layer == l
        for name, got in (("key", r.key), ("value", r.value)):
            file_dtype, shape, data = tensors[f"layer.{l}.{name}"]
            assert file_dtype == FILE_DTYPE[dtype]
            assert tuple(got.shape) == shape, f"layer {l} {name}"
            assert raw(got) == data, f"layer {l} {name}: bytes differ from medakv compress"
        file_dtype, shape, data = tensors[f"layer.{l}.positions"]
        assert (file_dtype, tuple(r.positions.shape)) == ("I32", shape)
        assert raw(r.positions) == data, f"layer {l} positions"
        assert tensors[f"layer.{l}.budget"][2] == np.int32(r.budget).tobytes()
        assert tensors[f"layer.{l}.entropy"][2] == np.float32(r.entropy).tobytes(), f"layer {l} entropy"
        assert tensors[f"layer.{l}.alpha"][2] == np.float32(r.alpha).tobytes(), f"layer {l} alpha"
    assert result.summary.tokens_kept == sum(r.budget for r in result.layers) == result.tokens_kept
    assert result.summary.tokens_in == layers * result.tokens
    assert result.summary.backend == "cpu"


def request(cache: Dict[str, Any], drop: tuple = ()) -> Dict[str, Any]:
    return {k: v for k, v in cache.items() if k not in drop}


@pytest.mark.parametrize("layout", ["hnd", "nhd"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_meda_matches_cli(client, cli_bin, tmp_path, dtype, layout):
    cache = random_cache(1, dtype=dtype, layout=layout)
    result = client.compress(**cache, layout=layout, policy="meda", rho=0.2)
    assert_same(result, cli_compress(cli_bin, tmp_path, cache, dtype, layout, "meda", 0.2, {}), dtype)
    # MEDA's budgets differ by layer and sum to round(rho * L * T).
    assert result.tokens_kept == round(0.2 * 3 * 97)
    assert result.layers[0].key.dtype == (np.uint16 if dtype == "bfloat16" else np.dtype(dtype))


@pytest.mark.parametrize("policy,options", [
    ("full", {}),
    ("streaming_llm", {"sinks": 3}),
    ("h2o", {"recent_fraction": 0.25}),
    ("snapkv", {"window": 4, "pool_kernel": 3}),
    ("pyramidkv", {"window": 3, "pool_kernel": 7, "pyramid_beta": 5.5}),
    ("look_m", {"merge": "weighted"}),
    ("meda", {"tau": 0.5, "alpha_min": 0.05, "alpha_max": 0.75, "exact_total": False, "entropy_heads": "mean_entropy",
              "entropy_source": "causal", "recent_fraction": 0.75, "text_prior": "keep_all_text",
              "shared_selection": True, "merge": "pivotal", "merge_threshold": "mean", "scale": 0.125}),
    ("meda", {"text_prior": "none", "merge": "none"}),
    ("amber", {}),
    ("amber", {"score_norm": "sum", "layer_budget": "mass", "sinks": 2, "recent_fraction": 0.25, "alpha_min": 0.05}),
    ("amber", {"layer_budget": "entropy", "tau": 3.0, "entropy_source": "causal", "merge": "average"}),
    ("amber", {"layer_budget": "depth", "depth_ratio": 0.5, "recent_search_rows": 4}),
    ("amber", {"recent_search_rows": 0, "score_norm": "visible_mean", "layer_budget": "uniform"}),
    ("amber", {"score_norm": "max", "layer_budget": "mass"}),
])
def test_every_policy_matches_cli(client, cli_bin, tmp_path, policy, options):
    cache = random_cache(2, dtype="float32", layout="nhd", tokens=131, q_tokens=9)
    result = client.compress(**cache, layout="nhd", policy=policy, rho=0.3, **options)
    assert_same(result, cli_compress(cli_bin, tmp_path, cache, "float32", "nhd", policy, 0.3, options), "float32")
    if policy == "full":
        assert all(r.budget == 131 for r in result.layers)


@pytest.mark.parametrize("policy,options", [("amber", {}), ("h2o", {}), ("snapkv", {}), ("meda", {}),
                                            ("amber", {"score_norm": "max", "layer_budget": "mass"})])
def test_probe_rows_after_the_cache_match_cli(client, cli_bin, tmp_path, policy, options):
    """Query rows after the cache (a question asked after the context: more rows than tokens, positions from T
    on) compress on the server as `medakv compress` does locally, and change what is kept."""
    cache = random_cache(7, dtype="float32", tokens=40)
    rng = np.random.default_rng(7)
    cache["queries"] = [(rng.standard_normal((4, 50, 16)) * 2).astype(np.float32) for _ in range(3)]
    cache["query_positions"] = [np.concatenate([np.arange(0, 40, 4), np.arange(40, 80)]).astype(np.int32)] * 3
    result = client.compress(**cache, policy=policy, rho=0.3, **options)
    assert_same(result, cli_compress(cli_bin, tmp_path, cache, "float32", "hnd", policy, 0.3, options), "float32")
    if policy in ("amber", "h2o"):  # the probes' attention counts: another selection than the in-cache rows alone
        inside = dict(cache, queries=[q[:, :10] for q in cache["queries"]],
                      query_positions=[p[:10] for p in cache["query_positions"]])
        alone = client.compress(**inside, policy=policy, rho=0.3, **options)
        assert any(not np.array_equal(a.positions, b.positions) for a, b in zip(result.layers, alone.layers))


@pytest.mark.parametrize("policy,options", [("amber", {"score_norm": "max", "layer_budget": "global", "sinks": 4}),
                                            ("h2o", {}), ("snapkv", {"window": 8})])
def test_probe_rows_attention_outside_the_cache_matches_cli(client, cli_bin, tmp_path, policy, options):
    """Probe rows with query_outside_lse (the attention a reconstruction pass gives its own tokens) compress on
    the server as `medakv compress` does locally; -inf everywhere is the same as none; real mass changes what is
    kept."""
    cache = random_cache(9, dtype="bfloat16", tokens=40)
    rng = np.random.default_rng(9)
    cache["queries"] = [to_wire(rng.standard_normal((4, 45, 16)) * 2, "bfloat16") for _ in range(3)]
    cache["query_positions"] = [np.arange(40, 85, dtype=np.int32)] * 3
    cache["query_outside_lse"] = [np.where(rng.random((4, 45)) < 0.2, -np.inf, rng.uniform(-2, 5, (4, 45)))
                                  .astype(np.float32) for _ in range(3)]
    result = client.compress(**cache, policy=policy, rho=0.3, **options)
    assert_same(result, cli_compress(cli_bin, tmp_path, cache, "bfloat16", "hnd", policy, 0.3, options), "bfloat16")
    without = {k: v for k, v in cache.items() if k != "query_outside_lse"}
    none = dict(cache, query_outside_lse=[np.full((4, 45), -np.inf, np.float32)] * 3)
    plain = client.compress(**without, policy=policy, rho=0.3, **options)
    assert [raw(r.positions) for r in client.compress(**none, policy=policy, rho=0.3, **options).layers] == \
        [raw(r.positions) for r in plain.layers]
    assert any(raw(a.positions) != raw(b.positions) for a, b in zip(result.layers, plain.layers))


def test_a_reconstruction_pass_gets_its_own_default(client, preset_client):
    """A request that names no policy and sends more query rows than tokens (a pass that repeats the context)
    runs amber with the max score and budgets per kv head across layers; fewer rows get the usual default."""
    cache = random_cache(8, dtype="float32", tokens=40)
    rng = np.random.default_rng(8)
    cache["queries"] = [(rng.standard_normal((4, 45, 16)) * 2).astype(np.float32) for _ in range(3)]
    cache["query_positions"] = [np.arange(40, 85, dtype=np.int32)] * 3
    for c in (client, preset_client):  # the presets' "default" (h2o) does not apply to it
        got = c.compress(**cache, policy=None, rho=0.25)
        ran = got.summary.policy
        assert ran.WhichOneof("kind") == "amber" and ran.preset == "" and ran.rho == 0.25
        assert ran.amber.layer_budget == pb.LAYER_BUDGET_GLOBAL and ran.amber.score_norm == pb.SCORE_NORM_MAX
        assert ran.amber.sinks == 4 and ran.amber.recent_search_rows == 0
        want = client.compress(**cache, policy="amber", rho=0.25, score_norm="max", layer_budget="global", sinks=4,
                               recent_search_rows=0, recent_fraction=0.0)
        assert [raw(r.positions) for r in got.layers] == [raw(r.positions) for r in want.layers]
    fewer = dict(cache, queries=[q[:, -10:] for q in cache["queries"]],
                 query_positions=[p[-10:] for p in cache["query_positions"]])
    assert client.compress(**fewer, policy=None).summary.policy.amber.layer_budget == pb.LAYER_BUDGET_DEPTH
    assert preset_client.compress(**fewer, policy=None).summary.policy.WhichOneof("kind") == "h2o"
    # Fewer rows than tokens that carry the attention they give outside the cache are probes all the same.
    outside = dict(fewer, query_outside_lse=[np.zeros((4, 10), np.float32)] * 3)
    for c in (client, preset_client):
        ran = c.compress(**outside, policy=None, rho=0.25).summary.policy
        assert ran.WhichOneof("kind") == "amber" and ran.amber.layer_budget == pb.LAYER_BUDGET_GLOBAL


@pytest.mark.parametrize("policy,dtype,layout,score_heads", [
    ("meda", "bfloat16", "nhd", 4),
    ("snapkv", "float16", "hnd", 2),
])
def test_precomputed_statistics_match_cli(client, cli_bin, tmp_path, policy, dtype, layout, score_heads):
    cache = random_cache(3, dtype=dtype, layout=layout, precomputed=True, score_heads=score_heads)
    result = client.compress(**cache, layout=layout, policy=policy, rho=0.25)
    assert_same(result, cli_compress(cli_bin, tmp_path, cache, dtype, layout, policy, 0.25, {}), dtype)


def test_small_chunks_both_ways_match_cli(client, cli_bin, tmp_path):
    # 999-byte request chunks split elements across messages; 1 KiB response chunks.
    cache = random_cache(4, dtype="bfloat16", layout="hnd", tokens=301, head_dim=24)
    result = client.compress(**cache, policy="h2o", rho=0.4, chunk_bytes=999, response_chunk_bytes=1024)
    assert_same(result, cli_compress(cli_bin, tmp_path, cache, "bfloat16", "hnd", "h2o", 0.4, {}), "bfloat16")


def test_default_query_positions_and_spans_match_cli(client, cli_bin, tmp_path):
    # No query_positions (the last q_tokens rows); modality as spans instead of flags.
    cache = request(random_cache(5, dtype="float16"), drop=("query_positions",))
    flags = cache.pop("modality")
    starts = np.flatnonzero(np.diff(np.concatenate(([0], flags))) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate((flags, [0]))) == -1) + 1
    spans = [(int(s), int(e - s)) for s, e in zip(starts, ends)]
    assert len(spans) == 2
    result = client.compress(**cache, modality=spans)
    assert_same(result, cli_compress(cli_bin, tmp_path, dict(cache, modality=flags), "float16", "hnd", "amber", 0.2,
                                     {}), "float16")
    same = client.compress(**cache, modality=[medakv.ModalitySpan(s, n) for s, n in spans])
    assert [raw(r.key) for r in same.layers] == [raw(r.key) for r in result.layers]


def test_text_only_cache_matches_cli(client, cli_bin, tmp_path):
    cache = request(random_cache(6, dtype="float32"), drop=("modality",))
    result = client.compress(**cache, rho=0.1)
    assert_same(result, cli_compress(cli_bin, tmp_path, cache, "float32", "hnd", "amber", 0.1, {}), "float32")


def test_ml_dtypes_bfloat16_round_trip(client):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cache = random_cache(7, dtype="bfloat16")
    bits = client.compress(**cache)
    as_bf16 = {k: ([x.view(ml_dtypes.bfloat16) for x in v] if k in ("keys", "values", "queries") else v)
               for k, v in cache.items()}
    typed = client.compress(**as_bf16)
    for a, b in zip(bits.layers, typed.layers):
        assert b.key.dtype == ml_dtypes.bfloat16 and a.key.dtype == np.uint16
        assert raw(a.key) == raw(b.key) and raw(a.value) == raw(b.value)
        assert raw(a.positions) == raw(b.positions)


def test_stacked_and_strided_inputs(client):
    cache = random_cache(8, dtype="float16")
    base = client.compress(**cache)
    # One 4-D tensor per kind, and non-contiguous views of the same values.
    stacked = dict(cache, keys=np.stack(cache["keys"]), values=np.stack(cache["values"]),
                   queries=np.stack(cache["queries"]), query_positions=np.stack(cache["query_positions"]))
    strided = dict(cache, keys=[np.asfortranarray(k) for k in cache["keys"]],
                   values=[np.repeat(v, 2, axis=2)[:, :, ::2] for v in cache["values"]])
    assert not strided["values"][0].flags.c_contiguous
    for variant in (stacked, strided):
        got = client.compress(**variant)
        assert [raw(r.key) + raw(r.value) + raw(r.positions) for r in got.layers] == \
               [raw(r.key) + raw(r.value) + raw(r.positions) for r in base.layers]


def test_result_summary_and_sizes(client):
    cache = random_cache(9, dtype="float16", layers=2, tokens=200)
    result = client.compress(**cache, rho=0.25)
    assert result.kept_fraction == pytest.approx(0.25)
    assert result.kv_bytes_in == 2 * 2 * 200 * 2 * 16 * 2
    assert result.kv_bytes_out == 2 * result.tokens_kept * 2 * 16 * 2
    s = result.summary
    assert s.bytes_in == sum(x.nbytes for k in ("keys", "values", "queries", "query_positions") for x in cache[k])
    assert s.bytes_out == sum(r.key.nbytes + r.value.nbytes + r.positions.nbytes for r in result.layers)
    assert s.times.statistics_seconds > 0 and s.times.receive_seconds >= 0
    for r in result.layers:
        assert r.positions.dtype == np.int32
        assert np.all(np.diff(r.positions, axis=1) > 0), "positions ascend per head"
        assert r.key.flags.writeable


def test_threads_share_one_client(client):
    cache = random_cache(10, dtype="float16")
    want = [raw(r.key) for r in client.compress(**cache).layers]
    got: list = [None] * 4
    errors: list = []

    def run(i: int) -> None:
        try:
            got[i] = [raw(r.key) for r in client.compress(**cache).layers]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert got == [want] * 4


def test_torch_tensors_match_numpy(client):
    torch = pytest.importorskip("torch")
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        cache = random_cache(11, dtype=dtype)
        want = client.compress(**cache)

        def tensor(x: np.ndarray) -> Any:
            if dtype == "bfloat16":
                return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(x)

        as_torch = dict(cache, keys=[tensor(x) for x in cache["keys"]], values=[tensor(x) for x in cache["values"]],
                        queries=[tensor(x) for x in cache["queries"]],
                        query_positions=[torch.from_numpy(p) for p in cache["query_positions"]])
        got = client.compress(**as_torch)
        for a, b in zip(want.layers, got.layers):
            assert isinstance(b.key, torch.Tensor) and b.key.dtype == torch_dtype
            assert b.positions.dtype == torch.int32
            assert raw(a.key) == raw(b.key) and raw(a.value) == raw(b.value)
            assert raw(a.positions) == raw(b.positions)


PRESETS = """
preset { name: "soft" policy { rho: 0.1 meda { tau: 5 select { merge: MERGE_MODE_NONE } } } }
preset { name: "default" policy { rho: 0.3 h2o {} } }
"""


@pytest.fixture(scope="module")
def preset_client(start_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "presets.txtpb"
    path.write_text(PRESETS)
    with medakv.Client(start_server(f"--policy_presets={path}").address, timeout=120) as c:
        yield c


def test_preset_equals_its_options(preset_client):
    cache = random_cache(21, dtype="float16", tokens=150)
    want = preset_client.compress(**cache, policy="meda", rho=0.1, tau=5.0, merge="none")
    got = preset_client.compress(**cache, policy=None, rho=None, preset="soft")
    assert [raw(r.key) for r in got.layers] == [raw(r.key) for r in want.layers]
    assert [raw(r.positions) for r in got.layers] == [raw(r.positions) for r in want.layers]
    ran = got.summary.policy
    assert ran.preset == "soft" and ran.WhichOneof("kind") == "meda"
    assert ran.rho == pytest.approx(0.1) and ran.meda.tau == 5
    assert want.summary.policy.preset == ""
    # rho replaces the preset's.
    half = preset_client.compress(**cache, policy=None, rho=0.5, preset="soft")
    assert half.summary.policy.rho == 0.5 and half.kept_fraction == pytest.approx(0.5, abs=0.01)
    # The server's own "default" preset.
    default = preset_client.compress(**cache, policy=None, rho=None, preset="default")
    assert default.summary.policy.WhichOneof("kind") == "h2o" and default.summary.policy.rho == pytest.approx(0.3)


def test_a_request_that_names_no_policy_gets_the_servers_default(preset_client, client):
    cache = random_cache(24, dtype="float16", tokens=150)
    ran = preset_client.compress(**cache).summary.policy  # policy=None, rho=None: the "default" preset
    assert ran.preset == "default" and ran.WhichOneof("kind") == "h2o" and ran.rho == pytest.approx(0.3)
    ran = preset_client.compress(**cache, rho=0.5).summary.policy
    assert ran.preset == "default" and ran.WhichOneof("kind") == "h2o" and ran.rho == pytest.approx(0.5)
    ran = preset_client.compress(**cache, policy="snapkv").summary.policy
    assert ran.preset == "" and ran.WhichOneof("kind") == "snapkv"
    # A server without presets runs amber at 0.2, as a request naming amber does.
    plain = client.compress(**cache)
    named = client.compress(**cache, policy="amber", rho=0.2)
    assert plain.summary.policy.WhichOneof("kind") == "amber" and plain.summary.policy.rho == pytest.approx(0.2)
    assert [raw(r.key) for r in plain.layers] == [raw(r.key) for r in named.layers]


def test_unknown_preset_is_the_servers_error(preset_client):
    cache = random_cache(22, dtype="float16")
    with pytest.raises(medakv.MedakvError) as e:
        preset_client.compress(**cache, policy=None, preset="sharp")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no such preset (this server has: soft, default)" in e.value.details()


def test_compress_cache_with_a_preset(preset_client):
    cache = random_cache(23, dtype="float32", tokens=120)
    preset_client.put_cache("preset-cache", **cache, overwrite=True)
    result = preset_client.compress_cache("preset-cache", policy=None, rho=None, preset="soft")
    assert result.summary.policy.preset == "soft"
    assert result.summary.tokens_kept == round(0.1 * 3 * 120)
