"""medakv.hf: transformers-style caches into a request, and results back into per-layer (key, value) pairs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import random_cache
from test_compress import raw

import medakv
from medakv.hf import cache_layers, from_hf_cache, to_hf_cache


def batched(seed: int):
    """A batch of 2 sequences, [batch, heads, tokens, head_dim] per layer, and the cache of sequence 1."""
    a = random_cache(seed, layers=3, tokens=64, dtype="float16")
    b = random_cache(seed + 1, layers=3, tokens=64, dtype="float16")
    pkv = tuple((np.stack([ka, kb]), np.stack([va, vb]))
                for ka, kb, va, vb in zip(a["keys"], b["keys"], a["values"], b["values"]))
    queries = [np.stack([qa, qb]) for qa, qb in zip(a["queries"], b["queries"])]
    return pkv, queries, b


class NewCache:  # transformers >= 4.56: cache.layers[i].keys / .values
    def __init__(self, pkv):
        self.layers = [SimpleNamespace(keys=k, values=v) for k, v in pkv]


class OldCache:  # DynamicCache 4.36 .. 4.55
    def __init__(self, pkv):
        self.key_cache = [k for k, _ in pkv]
        self.value_cache = [v for _, v in pkv]


class LegacyOnly:
    def __init__(self, pkv):
        self._pkv = pkv

    def to_legacy_cache(self):
        return self._pkv


@pytest.mark.parametrize("wrap", [tuple, list, NewCache, OldCache, LegacyOnly])
def test_cache_forms(wrap):
    pkv, _, _ = batched(50)
    got = cache_layers(wrap(pkv))
    assert len(got) == 3
    assert all(k is pk and v is pv for (k, v), (pk, pv) in zip(got, pkv))


def test_round_trip_through_the_server(client):
    pkv, queries, second = batched(51)
    request = from_hf_cache(pkv, queries=queries, batch_index=1)
    assert set(request) == {"keys", "values", "queries"}
    assert all(np.shares_memory(k, pk) for k, (pk, _) in zip(request["keys"], pkv))  # views, no copy
    result = client.compress(**request, modality=second["modality"], policy="meda", rho=0.2)
    want = client.compress(second["keys"], second["values"], second["queries"], modality=second["modality"],
                           policy="meda")
    assert [raw(r.key) for r in result.layers] == [raw(r.key) for r in want.layers]

    pairs = to_hf_cache(result)
    assert len(pairs) == 3
    budgets = [r.budget for r in result.layers]
    assert len(set(budgets)) > 1  # layers of different length
    for (k, v), r in zip(pairs, result.layers):
        assert k.shape == (1, 2, r.budget, 16) and v.shape == k.shape
        assert raw(k) == raw(r.key) and raw(v) == raw(r.value)
    assert [k.shape for k, _ in to_hf_cache(result, batch_dim=False)] == [(2, b, 16) for b in budgets]


def test_nhd_results_come_back_in_hnd_order(client):
    cache = random_cache(52, layers=2, tokens=50, dtype="float32", layout="nhd")
    result = client.compress(**cache, layout="nhd", rho=0.3)
    for (k, v), r in zip(to_hf_cache(result), result.layers):
        assert k.shape == (1, 2, r.budget, 16)
        assert np.array_equal(k[0], r.key.transpose(1, 0, 2)) and np.array_equal(v[0], r.value.transpose(1, 0, 2))


def test_stored_cache_to_hf(client):
    cache = random_cache(53, layers=2, tokens=30, dtype="float16")
    client.put_cache("hf/a", **cache, overwrite=True)
    pairs = to_hf_cache(client.get_cache("hf/a"))
    assert [k.shape for k, _ in pairs] == [(1, 2, 30, 16)] * 2
    assert raw(pairs[1][1]) == raw(cache["values"][1])
    client.delete_cache("hf/a")


def test_bad_hf_inputs():
    pkv, queries, _ = batched(54)
    with pytest.raises(ValueError, match="batch_index 2 is outside the batch of 2"):
        from_hf_cache(pkv, batch_index=2)
    with pytest.raises(ValueError, match="queries: 2 layers, but past_key_values has 3"):
        from_hf_cache(pkv, queries=queries[:2])
    with pytest.raises(TypeError, match="expected a transformers Cache or a sequence of"):
        from_hf_cache(42)
    with pytest.raises(ValueError, match="holds no attention keys and values"):
        from_hf_cache(SimpleNamespace(layers=[SimpleNamespace(keys=None, values=None)]))
    with pytest.raises(ValueError, match=r"shape \(5,\), expected \[batch, heads, tokens, head_dim\]"):
        from_hf_cache([(np.zeros(5), np.zeros(5))])


def test_torch_cache(client):
    torch = pytest.importorskip("torch")
    pkv, queries, second = batched(55)
    tpkv = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in pkv]
    request = from_hf_cache(tpkv, queries=[torch.from_numpy(q) for q in queries], batch_index=1)
    result = client.compress(**request, modality=torch.from_numpy(second["modality"]))
    pairs = to_hf_cache(result)
    assert all(isinstance(k, torch.Tensor) and k.shape == (1, 2, r.budget, 16) for (k, _), r in zip(pairs, result.layers))
    want = client.compress(second["keys"], second["values"], second["queries"], modality=second["modality"])
    assert [raw(k[0]) for k, _ in pairs] == [raw(r.key) for r in want.layers]


def test_the_package_works_without_torch():
    """Without torch and transformers: the core and the converters import; the torch side says what to install."""
    import subprocess
    import sys
    code = """
import sys
sys.modules["torch"] = None          # import torch now raises ImportError
sys.modules["transformers"] = None
import numpy as np
import medakv, medakv.hf
pairs = medakv.hf.cache_layers([(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4)))])
assert len(pairs) == 1
try:
    medakv.hf.compress
except ImportError as e:
    print("ImportError:", e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ImportError: medakv.hf.compress needs torch and transformers >= 5.2 (pip install 'medakv[hf]')" in done.stdout
