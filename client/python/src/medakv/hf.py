"""Hugging Face transformers models and caches, in and out of medakv-server.

The worker's path (needs torch and transformers >= 5.2: ``pip install
'medakv[hf]'``; imported on first use)::

    import medakv.hf

    cache = medakv.hf.compress(model, context_ids, rho=0.25)          # prefill, compress on the server
    out = model.generate(torch.cat([context_ids, question_ids], -1),
                         past_key_values=cache.copy(), max_new_tokens=64)

    pipe = medakv.hf.pipeline(model, tokenizer, rho=0.25)            # or, in one call per context
    pipe(context, questions=["...", "..."])["answers"]

- ``capture_queries(model)``: a context manager recording every attention
  layer's post-RoPE queries (and keys and values) during a forward pass.
- ``compress(model, context_ids, ...)``: prefill with capture, compress on
  the server (``client``, default ``$MEDAKV_SERVER`` or 127.0.0.1:50051),
  return a ``CompressedCache``. ``probe="reconstruct"`` scores the cache
  for questions not yet asked (a reconstruction pass, the KVzip idea),
  ``probe="question"`` with a known question's rows.
- ``CompressedCache``: a transformers ``Cache`` that ``generate()`` and a
  hand-written forward loop decode correctly (original positions, per-layer
  lengths, sliding windows by original position); ``copy()`` for reuse.
- ``pipeline(model, tokenizer, ...)``: ``pipe(context, question=...)``.

``rho`` is the fraction of the cache KEPT: kvpress's ``compression_ratio``
(the fraction removed) of 0.75 is ``rho=0.25``. See docs/python_hf.md.

Without torch, the converters work on NumPy arrays and any cache object:
``from_hf_cache`` turns one sequence of a ``past_key_values`` (a
``DynamicCache`` of any version, or the legacy tuple ``((key, value),
...)``, each tensor ``[batch, kv_heads, tokens, head_dim]``) into the
per-layer arguments of ``Client.compress``; ``to_hf_cache`` turns a result
back into per-layer ``(key, value)`` pairs ``[1, kv_heads, kept_l,
head_dim]``, ``kept_l`` varying by layer. Such pairs are NOT a cache that
``generate()`` can use as it is (the layers' lengths differ and the context's
length is lost): use ``CompressedCache``."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _arrays
from .types import CompressResult, StoredCache

__all__ = ["CompressedCache", "Pipeline", "cache_layers", "capture_queries", "compress", "from_hf_cache",
           "outside_lse", "pipeline", "to_hf_cache"]

_TORCH_NAMES = ("PROBES", "RECONSTRUCT_PROMPT", "CapturedQueries", "CompressedCache", "Pipeline", "attention_modules",
                "capture_queries", "compress", "default_client", "outside_lse", "pipeline")


def __getattr__(name: str) -> Any:
    """The torch side (``_hf_cache``), imported on first use so that the package works without torch."""
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module 'medakv.hf' has no attribute {name!r}")
    try:
        from . import _hf_cache
    except ImportError as e:
        raise ImportError(f"medakv.hf.{name} needs torch and transformers >= 5.2 "
                          f"(pip install 'medakv[hf]'): {e}") from e
    return getattr(_hf_cache, name)


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
    uses). The tensors are NumPy arrays or torch tensors as in the result.
    For decoding, ``CompressedCache.from_result(result, model)`` is the cache
    object (a plain ``DynamicCache`` of these pairs decodes wrongly: it
    takes the first layer's kept length for the context's).
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
