"""Hugging Face-style caches in and out.

A ``transformers`` model returns its KV cache as ``past_key_values``: a
``DynamicCache`` (any version) or the legacy tuple ``((key, value), ...)``,
each tensor ``[batch, kv_heads, tokens, head_dim]``. ``from_hf_cache`` turns
one sequence of the batch into the per-layer arguments of
``Client.compress``; ``to_hf_cache`` turns the result back into per-layer
``(key, value)`` pairs, ``[1, kv_heads, kept_l, head_dim]``, whose length
``kept_l`` varies by layer under MEDA's budgets::

    import medakv
    from medakv.hf import from_hf_cache, to_hf_cache

    out = model(**inputs, use_cache=True)
    request = from_hf_cache(out.past_key_values, queries=captured_queries)
    result = client.compress(**request, modality=image_flags, policy="meda", rho=0.2)
    compact = to_hf_cache(result)  # [(key, value), ...] per layer

The keys are post-RoPE as the cache holds them, so the kept rows stay valid
at their original positions: decoding continues at position ``tokens`` (the
prompt's length, not ``kept_l``), and each layer attends to its own
``kept_l`` rows. ``result.layers[l].positions`` says which original token
each row is (per kv head). Queries are not part of a transformers cache; a
worker captures them during the prefill (see bench/dump_hf_cache.py), as
``[batch, q_heads, q_tokens, head_dim]`` per layer.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _arrays
from .types import CompressResult, StoredCache

__all__ = ["cache_layers", "from_hf_cache", "to_hf_cache"]


def cache_layers(past_key_values: Any) -> List[Tuple[Any, Any]]:
    """``[(key, value), ...]`` per layer of a transformers cache of any version, or of a legacy tuple."""
    cache = past_key_values
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)) and not isinstance(cache, (list, tuple)):  # transformers >= 4.56
        out = []
        for i, layer in enumerate(layers):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not _arrays.is_tensor(k) or not _arrays.is_tensor(v):
                raise ValueError(f"past_key_values layer {i} ({type(layer).__name__}) holds no attention keys and "
                                 "values (a linear-attention or recurrent layer?)")
            out.append((k, v))
        return out
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):  # DynamicCache 4.36 .. 4.55
        return list(zip(cache.key_cache, cache.value_cache))
    if hasattr(cache, "to_legacy_cache"):
        cache = cache.to_legacy_cache()
    if isinstance(cache, (list, tuple)) and cache and all(
            isinstance(layer, (list, tuple)) and len(layer) >= 2 for layer in cache):
        return [(layer[0], layer[1]) for layer in cache]
    raise TypeError(f"past_key_values: expected a transformers Cache or a sequence of (key, value) pairs, "
                    f"got {type(past_key_values).__name__}")


def _sequence(x: Any, batch_index: int, what: str) -> Any:
    """Sequence ``batch_index`` of a ``[batch, heads, tokens, head_dim]`` tensor (a view); 3-D tensors as they are."""
    if not _arrays.is_tensor(x):
        raise TypeError(f"{what}: expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) == 3:
        return x
    if len(shape) != 4:
        raise ValueError(f"{what}: shape {shape}, expected [batch, heads, tokens, head_dim]")
    if not (-shape[0] <= batch_index < shape[0]):
        raise ValueError(f"batch_index {batch_index} is outside the batch of {shape[0]} ({what})")
    return x[batch_index]


def from_hf_cache(past_key_values: Any, queries: Optional[Sequence[Any]] = None, *,
                  batch_index: int = 0) -> Dict[str, List[Any]]:
    """The ``keys``, ``values`` (and ``queries``) arguments of ``Client.compress`` for one sequence.

    ``past_key_values``: a transformers cache or ``[(key, value), ...]``
    with tensors ``[batch, kv_heads, tokens, head_dim]`` (or without the
    batch dim). ``queries``: per layer ``[batch, q_heads, q_tokens,
    head_dim]`` (or without the batch dim). The tensors are views of the
    cache's (no copy); the layout is "hnd", the client's default.
    """
    if isinstance(batch_index, bool) or not isinstance(batch_index, int):
        raise TypeError(f"batch_index: expected an int, got {type(batch_index).__name__}")
    pairs = cache_layers(past_key_values)
    if not pairs:
        raise ValueError("past_key_values: the cache has no layer")
    request: Dict[str, List[Any]] = {
        "keys": [_sequence(k, batch_index, f"past_key_values[{i}] key") for i, (k, _) in enumerate(pairs)],
        "values": [_sequence(v, batch_index, f"past_key_values[{i}] value") for i, (_, v) in enumerate(pairs)],
    }
    if queries is not None:
        queries = list(queries)
        if len(queries) != len(pairs):
            raise ValueError(f"queries: {len(queries)} layers, but past_key_values has {len(pairs)}")
        request["queries"] = [_sequence(q, batch_index, f"queries[{i}]") for i, q in enumerate(queries)]
    return request


def to_hf_cache(result: CompressResult | StoredCache, *, batch_dim: bool = True) -> List[Tuple[Any, Any]]:
    """Per layer ``(key, value)``, ``[1, kv_heads, kept_l, head_dim]`` (``batch_dim``) or ``[kv_heads, kept_l, head_dim]``.

    Works for the results of ``Client.compress`` and ``Client.get_cache``, in
    either layout (NHD results are transposed to the HND order transformers
    uses). The tensors are NumPy arrays or torch tensors as in the result;
    with torch, ``DynamicCache.from_legacy_cache(tuple(pairs))`` (or setting
    the layers of a new cache) gives a cache object again.
    """
    layout = result.layout if isinstance(result, CompressResult) else result.info.shape.layout
    out = []
    for layer in result.layers:
        k, v = layer.key, layer.value
        if layout == "nhd":  # [kept, kv_heads, d] -> [kv_heads, kept, d]
            k, v = _swap01(k), _swap01(v)
        if batch_dim:
            k, v = k[None], v[None]
        out.append((k, v))
    return out


def _swap01(x: Any) -> Any:
    if _arrays.is_torch_tensor(x):
        return x.transpose(0, 1).contiguous()
    return x.transpose(1, 0, 2).copy()
