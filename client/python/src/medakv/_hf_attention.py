"""transformers' attention functions, observed and steered (the torch side of ``medakv.hf``).

A model of transformers 5 looks its attention function up at every call,
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)``: the modeling module's own ``eager_attention_forward``
for "eager", the registered function for every other implementation. The
first time ``medakv.hf`` meets a model, ``install(model)`` wraps that
lookup, so that whatever it finds (functions registered later included)
comes wrapped in a function that does nothing but call it, unless this
thread has asked for something:

- a capture (``capture_queries``) records the query (and, if asked, the key
  and value) that attention receives, post-RoPE and post q/k norm, then calls
  the original with its own arguments: the model's mask and results are
  unchanged;
- a ``CompressedCache`` that has just handed a layer its kept keys (an entry
  in ``pending``, matched by identity with the key tensor attention receives)
  replaces the model's mask, which cannot describe a compressed layer, with
  one built from the kept tokens' original positions: per kv head, causal,
  and with the layer's sliding window. The model's own eager function takes
  it as an additive mask; transformers' SDPA function as a boolean one; any
  other implementation (flash, flex) runs as eager for these calls, since it
  takes no mask of that form.

The wrapped lookup stays in place (it is inert) and carries
``__medakv_wrapped__``, so installing twice changes nothing. State is per
thread.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

_MARK = "__medakv_wrapped__"
_install_lock = threading.Lock()


@dataclass
class Pending:
    """What a compressed layer handed to attention: its keys and every key's and query's position."""

    key: torch.Tensor                 # [batch, kv_heads, L, head_dim], the tensor attention receives
    key_positions: torch.Tensor       # [batch, kv_heads, L] int64, original positions
    query_positions: torch.Tensor     # [n] int64
    check_module: Callable[[Any], None]
    owner: int                        # id() of the CompressedCache that handed the keys


@dataclass
class Recorder:
    """One active capture: the model's modules and what each layer's attention received, per forward call."""

    module_ids: frozenset[int]
    keep_kv: bool
    keep_masks: bool = False
    queries: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    keys: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    values: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    masks: Dict[int, List[Optional[torch.Tensor]]] = field(default_factory=dict)
    kwargs: Dict[int, Dict[str, Any]] = field(default_factory=dict)


class _State(threading.local):
    def __init__(self) -> None:
        self.recorders: List[Recorder] = []
        self.pending: Dict[int, Pending] = {}


STATE = _State()


def _eager_of(module: Any) -> Callable[..., Any]:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward: "
                           f"{type(module).__name__} cannot attend over a medakv CompressedCache")
    return fn  # type: ignore[no-any-return]


def _layer_of(module: Any) -> int:
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise RuntimeError(f"attention module {type(module).__name__} has no integer layer_idx")
    return layer


def _record(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: Optional[torch.Tensor], kwargs: Dict[str, Any]) -> None:
    for rec in STATE.recorders:
        if id(module) in rec.module_ids:
            layer = _layer_of(module)
            rec.queries.setdefault(layer, []).append(query.detach())
            if rec.keep_kv:
                rec.keys.setdefault(layer, []).append(key.detach())
                rec.values.setdefault(layer, []).append(value.detach())
            if rec.keep_masks:
                rec.masks.setdefault(layer, []).append(mask.detach() if isinstance(mask, torch.Tensor) else None)
            rec.kwargs[layer] = {k: v for k, v in kwargs.items()
                                 if v is None or isinstance(v, (bool, int, float, str))}


def _position_mask(query: torch.Tensor, p: Pending, sliding_window: Optional[int]) -> torch.Tensor:
    """[batch, q_heads, n, L] bool: may query row i of head h see key j of its kv head."""
    kpos = p.key_positions.unsqueeze(2)                       # [b, Hkv, 1, L]
    qpos = p.query_positions.view(1, 1, -1, 1)                # [1, 1, n, 1]
    allowed = (kpos >= 0) & (kpos <= qpos)                    # position -1: a padded row, never seen
    if sliding_window is not None:
        allowed = allowed & (qpos - kpos < sliding_window)
    groups = query.shape[1] // p.key.shape[1]
    if groups > 1:
        allowed = allowed.repeat_interleave(groups, dim=1)     # query head h reads kv head h // groups
    return allowed


def _wrap(original: Callable[..., Any], name: str) -> Callable[..., Any]:
    """The wrapper of one attention function, found under ``name`` (the module's own eager one for "eager")."""

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        fn = original
        if STATE.recorders:
            _record(module, query, key, value, attention_mask, kwargs)
        if STATE.pending:
            layer = getattr(module, "layer_idx", None)
            p = STATE.pending.get(layer) if isinstance(layer, int) else None
            if p is not None and p.key is key and isinstance(layer, int):
                del STATE.pending[layer]
                p.check_module(module)
                window = kwargs.pop("sliding_window") if "sliding_window" in kwargs else getattr(
                    module, "sliding_window", None)
                allowed = _position_mask(query, p, window)
                if name == "sdpa" and kwargs.get("softcap") is None:
                    return fn(module, query, key, value, allowed, *args, **kwargs)
                eager = _eager_of(module)
                additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
                additive.masked_fill_(~allowed, torch.finfo(query.dtype).min)
                return eager(module, query, key, value, additive, *args, **kwargs)
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    setattr(attention, _MARK, True)
    attention.__wrapped__ = original  # type: ignore[attr-defined]
    attention.__name__ = f"medakv_{name}_attention"
    return attention


def attention_modules(model: Any) -> Dict[int, Any]:
    """The language model's self-attention modules by layer: modules with an integer ``layer_idx`` and q/k projections.

    Searched in ``model.get_decoder()`` where the model has one (the text
    decoder of a multimodal model, not its vision tower), else in the model.
    """
    root = model
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if decoder is not None:
            root = decoder
    found: Dict[int, Any] = {}
    for m in root.modules():
        layer = getattr(m, "layer_idx", None)
        if isinstance(layer, int) and hasattr(m, "k_proj") and hasattr(m, "q_proj"):
            if layer in found and found[layer] is not m:
                raise ValueError(f"{type(model).__name__}: two attention modules claim layer {layer} "
                                 "(an encoder-decoder or a model with cross-attention is not supported)")
            found[layer] = m
    if not found:
        raise ValueError(f"{type(model).__name__}: no attention module with layer_idx, q_proj and k_proj found "
                         "(medakv.hf supports decoder-only transformers models that use the attention interface)")
    return found


def install(model: Any) -> None:
    """Wraps the attention lookup of the model's modeling modules (once; see the module docstring)."""
    with _install_lock:
        for module in attention_modules(model).values():
            interface = getattr(sys.modules[type(module).__module__], "ALL_ATTENTION_FUNCTIONS", None)
            lookup = getattr(interface, "get_interface", None)
            if interface is None or lookup is None:
                raise ValueError(f"{type(module).__module__} does not look attention up in transformers' "
                                 "AttentionInterface (transformers >= 5 is needed)")
            if getattr(lookup, _MARK, False):
                continue
            interface.get_interface = _wrapped_lookup(lookup)


def _wrapped_lookup(lookup: Callable[[str, Callable[..., Any]], Callable[..., Any]]) -> Callable[..., Any]:
    """``get_interface`` that returns the wrapper of what it found (made per lookup: nothing is kept)."""

    def get_interface(attn_implementation: str, default: Callable[..., Any]) -> Callable[..., Any]:
        return _wrap(lookup(attn_implementation, default), attn_implementation)

    setattr(get_interface, _MARK, True)
    return get_interface
