"""``capture_queries``, ``compress``, ``CompressedCache`` and ``pipeline``: the torch side of ``medakv.hf``.

Needs torch and transformers >= 5.2 (``pip install 'medakv[hf]'``); imported by
``medakv.hf`` on first use of one of these names.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _hf_attention as attn
from .client import Client
from .types import CompressResult

__all__ = ["PROBES", "RECONSTRUCT_PROMPT", "CapturedQueries", "CompressedCache", "Pipeline", "attention_modules",
           "capture_queries", "compress", "pipeline"]

#: The model's self-attention modules by layer index (what capture and CompressedCache work with).
attention_modules = attn.attention_modules

DEFAULT_SERVER = "127.0.0.1:50051"


# ---- capture ------------------------------------------------------------------------------------

class CapturedQueries:
    """What ``capture_queries`` recorded: per layer, every forward call's rows joined along the tokens.

    ``queries[l]``: ``[batch, q_heads, tokens, head_dim]``, post-RoPE (and
    post q_norm where the model has one), exactly as attention received them.
    ``keys[l]``, ``values[l]``: ``[batch, kv_heads, tokens, head_dim]`` the
    same way (only with ``keys=True``; a cached forward gives attention the
    cache's keys, so record without a cache, ``use_cache=False``).
    ``masks[l]``: the attention mask each call received, in call order (None
    where it got none; only with ``masks=True``). ``attention_kwargs[l]``:
    the scalar keyword arguments of the layer's last call (``scaling``,
    ``sliding_window``, ``softcap``, ...). ``calls[l]``: how many attention
    calls the layer made. Filled when the ``with`` block ends.
    """

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.queries: List[torch.Tensor] = []
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self.masks: List[List[Optional[torch.Tensor]]] = []
        self.attention_kwargs: List[Dict[str, Any]] = []
        self.calls: List[int] = []

    def _fill(self, rec: attn.Recorder) -> None:
        missing = [layer for layer in range(self.layers) if layer not in rec.queries]
        if missing and len(missing) < self.layers:
            raise RuntimeError(f"capture_queries: layers {missing} of {self.layers} ran no attention through "
                               "transformers' attention interface")
        if missing:
            return  # no forward pass inside the block
        self.queries = [_join(rec.queries[layer]) for layer in range(self.layers)]
        self.calls = [len(rec.queries[layer]) for layer in range(self.layers)]
        self.attention_kwargs = [rec.kwargs[layer] for layer in range(self.layers)]
        if rec.keep_masks:
            self.masks = [rec.masks[layer] for layer in range(self.layers)]
        if rec.keep_kv:
            self.keys = [_join(rec.keys[layer]) for layer in range(self.layers)]
            self.values = [_join(rec.values[layer]) for layer in range(self.layers)]


def _join(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


@contextlib.contextmanager
def capture_queries(model: Any, *, keys: bool = False, masks: bool = False) -> Iterator[CapturedQueries]:
    """Records every attention layer's post-RoPE queries during the forward passes run inside the block.

    ::

        with medakv.hf.capture_queries(model) as cap:
            model(input_ids=ids, use_cache=False)
        cap.queries[l]  # [batch, q_heads, tokens, head_dim] per layer

    Works for any decoder-only model that calls attention through
    transformers' attention interface (Llama/SmolLM2, Gemma 3 with its
    sliding-window layers and q/k norms, Qwen2/Qwen3, Mistral are tested),
    with any attention implementation. The model runs exactly as without the
    capture (its own attention function, mask and results). ``keys=True``
    also records the keys and values attention received, ``masks=True`` the
    attention masks. Only this thread's calls of this model's decoder
    (``model.get_decoder()`` where it has one: not a vision tower) are
    recorded.
    """
    layers = attn.attention_modules(model)
    attn.install(model)
    rec = attn.Recorder(module_ids=frozenset(id(m) for m in layers.values()), keep_kv=keys, keep_masks=masks)
    out = CapturedQueries(max(layers) + 1)
    attn.STATE.recorders.append(rec)
    try:
        yield out
    finally:
        attn.STATE.recorders.remove(rec)
    out._fill(rec)


# ---- the cache ----------------------------------------------------------------------------------

class _CompressedLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One layer of a ``CompressedCache``: kept keys and values, and each row's original position per kv head."""

    keys: torch.Tensor
    values: torch.Tensor
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, seen: int,
                 sliding: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.keys = keys                # [batch, kv_heads, L, head_dim]
        self.values = values
        self.positions = positions      # [batch, kv_heads, L] int64
        self.seen = seen                # positions 0 .. seen-1 have been processed (kept or not)
        self.is_sliding = sliding
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        new = torch.arange(self.seen, self.seen + n, dtype=torch.int64, device=self.positions.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new.expand(*self.positions.shape[:2], n)], dim=-1)
        self.seen += n
        return self.keys, self.values

    def get_mask_sizes(self, query_length: Any) -> Tuple[int, int]:
        # The mask the model builds from this is replaced (per layer, by position) before attention.
        # transformers before 5.3 passes the new tokens' cache positions (a tensor), later ones their count.
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seen + n, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5.3
        return -1

    def reset(self) -> None:
        raise ValueError("a CompressedCache cannot be reset: use cache.copy() before decoding to keep a fresh one")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a CompressedCache cannot be cropped (assisted or speculative decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys = self.keys[indices.to(self.keys.device)]
        self.values = self.values[indices.to(self.values.device)]
        self.positions = self.positions[indices.to(self.positions.device)]

    def clone(self) -> "_CompressedLayer":
        return _CompressedLayer(self.keys.clone(), self.values.clone(), self.positions.clone(), self.seen,
                                self.is_sliding)


def _fingerprint(module: Any) -> Tuple[float, ...]:
    """A few weights of an attention module: tells another model (or other weights) from the one compressed for."""
    w = module.k_proj.weight.detach().reshape(-1)
    return tuple(float(x) for x in w[: min(8, w.numel())].float().cpu())


class CompressedCache(Cache):
    """A transformers ``Cache`` over a context compressed by medakv-server.

    Each layer holds its kept keys and values (layers keep different numbers
    of tokens; within a layer each kv head keeps its own tokens) and every
    kept row's ORIGINAL position. The cache reports the original context
    length ``T`` as its sequence length, so new tokens take positions T,
    T+1, ... as they would after the full context, and each layer attends to
    its kept keys by position: causally, and on sliding-window layers (Gemma
    3) only to keys within the window of the query's position. So both

    ::

        model.generate(torch.cat([context_ids, question_ids], -1), past_key_values=cache.copy(), ...)
        model(input_ids=question_ids, past_key_values=cache)     # a forward loop of your own

    decode as the model would over the kept tokens. New tokens are appended
    to every layer. ``copy()`` gives an independent cache, so one compression
    answers several questions.

    Made by ``medakv.hf.compress`` (or ``CompressedCache.from_result``). Only
    the model it was made for may use it (checked: layer count and shapes,
    and a few weights of each attention module on first use); input ids given
    to ``generate`` must start with the compressed context. Batch: the
    cache's own (1 from ``compress``); ``generate`` may repeat it
    (``num_return_sequences``, beams).
    """

    def __init__(self, layers: List[_CompressedLayer], *, context_length: int,
                 context_ids: Optional[torch.Tensor] = None, fingerprints: Optional[Dict[int, Tuple[float, ...]]] = None,
                 model_name: str = "", result: Optional[CompressResult] = None) -> None:
        super().__init__(layers=list(layers))
        self.context_length = context_length
        self.context_ids = context_ids
        self.result = result
        self._fingerprints = dict(fingerprints or {})
        self._model_name = model_name
        self._checked: set[int] = set()

    # ---- made from a result ---------------------------------------------------------------------

    @classmethod
    def from_result(cls, result: CompressResult, model: Any, *,
                    context_ids: Optional[torch.Tensor] = None) -> "CompressedCache":
        """The cache of ``Client.compress``'s result (torch tensors, batch of one) for ``model``."""
        if not isinstance(result, CompressResult):
            raise TypeError(f"result: expected a medakv.CompressResult, got {type(result).__name__}")
        modules = attn.attention_modules(model)
        if len(result.layers) != len(modules):
            raise ValueError(f"the result has {len(result.layers)} layers, {type(model).__name__} has {len(modules)}")
        attn.install(model)
        _guard_generation(model)
        types = getattr(model.config.get_text_config(), "layer_types", None) or []
        device = next(model.parameters()).device
        layers = []
        for i, r in enumerate(result.layers):
            k, v, pos = r.key, r.value, r.positions
            if not isinstance(k, torch.Tensor):
                raise TypeError("the result holds NumPy arrays: compress torch tensors to build a CompressedCache")
            if result.layout == "nhd":
                k, v, pos = k.transpose(0, 1), v.transpose(0, 1), torch.as_tensor(pos).transpose(0, 1)
            pos = torch.as_tensor(pos).to(device=device, dtype=torch.int64)
            sliding = i < len(types) and types[i] == "sliding_attention"
            layers.append(_CompressedLayer(k.contiguous().unsqueeze(0).to(device), v.contiguous().unsqueeze(0).to(device),
                                           pos.unsqueeze(0).contiguous(), result.tokens, sliding))
        if context_ids is not None:
            context_ids = torch.as_tensor(context_ids).reshape(1, -1).to(device)
            if context_ids.shape[1] != result.tokens:
                raise ValueError(f"context_ids: {context_ids.shape[1]} tokens, but the result is of {result.tokens}")
        return cls(layers, context_length=result.tokens, context_ids=context_ids,
                   fingerprints={i: _fingerprint(m) for i, m in modules.items()},
                   model_name=type(model).__name__, result=result)

    # ---- what it holds --------------------------------------------------------------------------

    @property
    def kept(self) -> List[int]:
        """Context rows held per layer and kv head: the tokens kept, or the largest head's count where the heads
        of a layer keep different numbers (amber's ``layer_budget="global"``; see ``kept_per_head``)."""
        return [int(layer.positions.shape[-1]) - (layer.seen - self.context_length) for layer in self._layers()]

    @property
    def kept_per_head(self) -> List[List[int]]:
        """Context tokens kept per layer, per kv head (rows at position -1 are padding and are never attended)."""
        return [[int(n) for n in (layer.positions[0, :, :kept] >= 0).sum(-1)]
                for layer, kept in zip(self._layers(), self.kept)]

    def positions(self, layer: int) -> torch.Tensor:
        """``[kv_heads, rows]``: the original position of every row layer ``layer`` holds now (batch item 0)."""
        return self._layers()[layer].positions[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held now (appended tokens included)."""
        return sum(x.numel() * x.element_size() for layer in self._layers() for x in (layer.keys, layer.values))

    @property
    def context_nbytes(self) -> int:
        """Bytes of the kept context's keys and values (what the compression left of ``full_nbytes``)."""
        total = 0
        for layer, kept in zip(self._layers(), self.kept):
            b, h, _, d = layer.keys.shape
            total += 2 * b * h * kept * d * layer.keys.element_size()
        return total

    @property
    def full_nbytes(self) -> int:
        """Bytes the uncompressed context's keys and values take (every layer, all T tokens)."""
        total = 0
        for layer in self._layers():
            b, h, _, d = layer.keys.shape
            total += 2 * b * h * self.context_length * d * layer.keys.element_size()
        return total

    def copy(self) -> "CompressedCache":
        """An independent cache in the same state (tensors copied): one compression, several questions."""
        out = CompressedCache([layer.clone() for layer in self._layers()], context_length=self.context_length,
                              context_ids=self.context_ids, fingerprints=self._fingerprints,
                              model_name=self._model_name, result=self.result)
        out._checked = set(self._checked)
        return out

    def __repr__(self) -> str:
        kept = self.kept
        return (f"CompressedCache({len(kept)} layers, context {self.context_length} tokens, kept "
                f"{min(kept)}..{max(kept)} per layer, seen {self.get_seq_length()})")

    def _layers(self) -> List[_CompressedLayer]:
        return self.layers  # type: ignore[return-value]

    # ---- transformers' Cache --------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        layers = self._layers()
        if not 0 <= layer_idx < len(layers):
            raise ValueError(f"CompressedCache: layer {layer_idx} does not exist (the cache has {len(layers)} layers: "
                             f"made for another model?)")
        stale = attn.STATE.pending.pop(layer_idx, None)
        if stale is not None and stale.owner == id(self):  # (another cache's: a forward interrupted midway)
            raise RuntimeError(f"CompressedCache: layer {layer_idx}'s last attention call did not go through medakv's "
                               "attention wrapper; use the model the cache was made for (medakv.hf.compress or "
                               "CompressedCache.from_result install the wrapper)")
        layer = layers[layer_idx]
        b, h, n, d = key_states.shape
        if n == 0:
            raise ValueError("CompressedCache: no new tokens; the input ids must be the compressed context followed "
                             f"by at least one new token (the cache holds {layer.seen} positions)")
        if (h, d) != (layer.keys.shape[1], layer.keys.shape[3]):
            raise ValueError(f"CompressedCache: layer {layer_idx} holds {layer.keys.shape[1]} kv heads of dim "
                             f"{layer.keys.shape[3]}, the model gives {h} of dim {d}: another model?")
        if b != layer.keys.shape[0]:
            raise ValueError(f"CompressedCache: a batch of {b} sequences, but the cache holds {layer.keys.shape[0]} "
                             "(compress each sequence's context, or let generate() expand the cache)")
        if key_states.dtype != layer.keys.dtype or key_states.device != layer.keys.device:
            raise ValueError(f"CompressedCache: the cache holds {layer.keys.dtype} on {layer.keys.device}, the model "
                             f"computes {key_states.dtype} on {key_states.device}")
        first_new = layer.seen
        keys, values = layer.update(key_states, value_states)
        qpos = torch.arange(first_new, first_new + n, dtype=torch.int64, device=layer.positions.device)
        attn.STATE.pending[layer_idx] = attn.Pending(key=keys, key_positions=layer.positions, query_positions=qpos,
                                                     check_module=lambda m: self._check_module(layer_idx, m),
                                                     owner=id(self))
        return keys, values

    def _check_module(self, layer_idx: int, module: Any) -> None:
        if id(module) in self._checked:
            return
        want = self._fingerprints.get(layer_idx)
        if want is not None and _fingerprint(module) != want:
            raise ValueError(f"CompressedCache: layer {layer_idx}'s attention weights differ from those of the "
                             f"{self._model_name} the cache was compressed for (another model?)")
        self._checked.add(id(module))

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Raises ValueError unless ``input_ids`` ([batch, n]) start with the compressed context and extend past what is cached."""
        seen = self.get_seq_length()
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] <= seen:
            raise ValueError(f"input_ids: {input_ids.shape[1]} tokens, but the CompressedCache already holds {seen} "
                             f"positions (the compressed context is {self.context_length}): pass the context's ids "
                             "followed by the new ones, e.g. torch.cat([context_ids, question_ids], -1)")
        if self.context_ids is not None:
            want = self.context_ids.to(input_ids.device)
            if not torch.equal(input_ids[:, : self.context_length], want.expand(input_ids.shape[0], -1)):
                raise ValueError(f"input_ids do not start with the {self.context_length} tokens of the compressed "
                                 "context")


def _guard_generation(model: Any) -> None:
    """Makes the model's ``generate()`` check its input ids against a CompressedCache it is given (once per model).

    The check is a method bound to the model (``copy.deepcopy`` binds it to
    the copy) that calls the class's own ``prepare_inputs_for_generation``."""
    prepare = getattr(model, "prepare_inputs_for_generation", None)
    if prepare is None or getattr(prepare, attn._MARK, False):
        return
    original = getattr(type(model), "prepare_inputs_for_generation")

    def prepare_inputs_for_generation(self: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, CompressedCache) and isinstance(input_ids, torch.Tensor):
            cache.check_input_ids(input_ids)
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
                raise ValueError("a CompressedCache takes no padding: the attention mask must be all ones (is a token "
                                 "of your input the tokenizer's pad token? pass attention_mask=torch.ones_like(ids))")
        return original(self, input_ids, *args, **kwargs)

    setattr(prepare_inputs_for_generation, attn._MARK, True)
    model.prepare_inputs_for_generation = types.MethodType(prepare_inputs_for_generation, model)


# ---- compress -----------------------------------------------------------------------------------

def default_client() -> Client:
    """A client of ``$MEDAKV_SERVER`` (host:port; default 127.0.0.1:50051)."""
    target = os.environ.get("MEDAKV_SERVER", "").strip() or DEFAULT_SERVER
    if "," in target:
        raise ValueError(f"MEDAKV_SERVER={target!r}: the Python client takes one server; pass client=")
    return Client(target)


def _context_ids(model: Any, context_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(context_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"context_ids: expected [tokens] or [1, tokens], got shape {tuple(ids.shape)} "
                         "(compress one context at a time)")
    if ids.shape[1] < 1:
        raise ValueError("context_ids: empty context")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"context_ids: expected integer token ids, got {ids.dtype}")
    return ids.to(device=next(model.parameters()).device, dtype=torch.int64)


PROBES = ("context", "question", "reconstruct")


def outside_lse(query: torch.Tensor, own_keys: torch.Tensor, first: int, scale: float,
                sliding_window: Optional[int] = None) -> torch.Tensor:
    """Each probe row's log-sum-exp of ``scale * q.k`` over the probe pass's own keys it attends.

    ``query``: ``[q_heads, rows, head_dim]``, the last ``rows`` rows of a
    pass of ``E`` tokens run after the cache; ``own_keys``: ``[kv_heads, E,
    head_dim]``, that pass's keys; row ``r`` is the pass's token ``first +
    r`` and attends its keys ``0 .. first + r`` (and only the last
    ``sliding_window`` positions where the layer has a window). Returns
    ``[q_heads, rows]`` float32, what ``Client.compress`` takes as
    ``query_outside_lse``. Computed in blocks of rows: O(rows x E) work, like
    the pass's own attention, and at most about 256 MiB of logits at once.
    """
    q_heads, rows, _ = query.shape
    kv_heads, E, _ = own_keys.shape
    k = own_keys.float().repeat_interleave(q_heads // kv_heads, dim=0).transpose(1, 2)  # [q_heads, d, E]
    out = torch.empty(q_heads, rows, dtype=torch.float32, device=query.device)
    block = max(1, (1 << 26) // max(1, q_heads * E))
    j = torch.arange(E, device=query.device).view(1, -1)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        logits = torch.matmul(query[:, r0:r1].float(), k) * scale                          # [q_heads, n, E]
        i = torch.arange(first + r0, first + r1, device=query.device).view(-1, 1)
        allowed = j <= i
        if sliding_window is not None:
            allowed = allowed & (i - j < sliding_window)
        logits.masked_fill_(~allowed, float("-inf"))
        out[:, r0:r1] = torch.logsumexp(logits, dim=-1)
    return out


def _probe_ids(model: Any, name: str, ids: Any) -> torch.Tensor:
    out = torch.as_tensor(ids)
    if out.dim() == 1:
        out = out.unsqueeze(0)
    if out.dim() != 2 or out.shape[0] != 1:
        raise ValueError(f"{name}: expected [tokens] or [1, tokens], got shape {tuple(out.shape)}")
    if out.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected integer token ids, got {out.dtype}")
    return out.to(device=next(model.parameters()).device, dtype=torch.int64)


@torch.no_grad()
def compress(model: Any, context_ids: Any, *, client: Optional[Client] = None, policy: Optional[str] = None,
             rho: Optional[float] = None, preset: Optional[str] = None, probe: str = "context",
             probe_ids: Any = None, query_rows: Optional[int] = None, modality: Any = None,
             **options: Any) -> CompressedCache:
    """Prefills ``context_ids`` with ``model``, compresses the cache on medakv-server, returns a ``CompressedCache``.

    ``client``: a ``medakv.Client`` (default: one of ``$MEDAKV_SERVER``,
    else 127.0.0.1:50051, closed afterwards). ``policy``, ``rho``,
    ``preset`` and ``**options`` are ``Client.compress``'s (``rho`` is the
    fraction KEPT, 1 - kvpress's ``compression_ratio``; ``policy=None``:
    the server's ``default`` preset, or amber at 0.2 when it has none).

    ``probe``: whose query rows score the cache (the cache itself always
    holds the context alone):

    - ``"context"`` (default): the context's own rows, from its prefill.
    - ``"question"``: the rows of ``probe_ids`` (the question's token ids)
      run after the context; one forward pass over context + question
      instead of the context's.
    - ``"reconstruct"``: the rows of a pass that makes the model repeat the
      context (the KVzip idea: a query-agnostic score, for a cache reused by
      questions not yet known). The pass runs over ``probe_ids`` after the
      context: by default the context ids once more; give an instruction
      followed by the context to prompt it (``Pipeline`` does). One forward
      pass over about twice the context: two to four times the cost of the
      context's prefill, and twice its activation memory.

    Probe rows sit at positions ``T, T+1, ...`` after the ``T`` context
    tokens and see every context key. Each is sent with the attention it
    gives the probe's own tokens (``query_outside_lse``, computed here from
    the captured queries and keys, at about the cost of the pass's own
    attention), so that its scores are its share of all its attention: a
    reconstruction pass that attends mostly to what it has just repeated
    says little about the context. It is computed with ``scale`` when given,
    else ``1/sqrt(head_dim)``, the server's default (a server preset with
    another ``scale`` would score against a mismatched normaliser).
    ``query_rows``: send only the last this
    many rows (default: all of them). ``modality``: ``Client.compress``'s
    visual-token spans or flags.
    """
    ids = _context_ids(model, context_ids)
    if query_rows is not None and (isinstance(query_rows, bool) or not isinstance(query_rows, int) or query_rows < 1):
        raise ValueError(f"query_rows: expected a positive int or None, got {query_rows!r}")
    if probe not in PROBES:
        raise ValueError(f"probe: expected one of {', '.join(map(repr, PROBES))}, got {probe!r}")
    if probe == "context":
        if probe_ids is not None:
            raise ValueError('probe_ids: only with probe="question" or probe="reconstruct"')
        extra = ids[:, :0]
    elif probe_ids is None:
        if probe == "question":
            raise ValueError('probe="question" needs probe_ids: the question\'s token ids')
        extra = ids
    else:
        extra = _probe_ids(model, "probe_ids", probe_ids)
    if probe != "context" and extra.shape[1] < 1:
        raise ValueError("probe_ids: empty")
    T = ids.shape[1]
    with capture_queries(model, keys=True) as cap:
        kwargs: Dict[str, Any] = {"use_cache": False}
        if "logits_to_keep" in _forward_parameters(model):
            kwargs["logits_to_keep"] = 1
        model(input_ids=torch.cat([ids, extra], dim=-1), **kwargs)
    rows = extra.shape[1] if probe != "context" else T
    if query_rows is not None:
        rows = min(rows, query_rows)
    end = T + extra.shape[1]
    queries = [q[0, :, end - rows:end] for q in cap.queries]
    positions = None if probe == "context" else torch.arange(end - rows, end, dtype=torch.int64)
    outside = None
    if probe != "context":
        scale = options.get("scale") or queries[0].shape[-1] ** -0.5
        outside = []
        for layer, q in enumerate(queries):
            window = cap.attention_kwargs[layer].get("sliding_window")
            outside.append(outside_lse(q, cap.keys[layer][0, :, T:end], extra.shape[1] - rows, float(scale),
                                       window if isinstance(window, int) and window > 0 else None))
    own = client is None
    c = default_client() if client is None else client
    try:
        result = c.compress([k[0, :, :T] for k in cap.keys], [v[0, :, :T] for v in cap.values], queries,
                            query_positions=positions, query_outside_lse=outside, policy=policy, rho=rho,
                            preset=preset, modality=modality,
                            **options)
    finally:
        if own:
            c.close()
    return CompressedCache.from_result(result, model, context_ids=ids)


def _forward_parameters(model: Any) -> Sequence[str]:
    import inspect
    return list(inspect.signature(model.forward).parameters)


def _cache_argument(model: Any) -> str:
    """The name the model takes its cache under: ``cache`` from transformers 5.2x on, ``past_key_values`` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


# ---- the pipeline -------------------------------------------------------------------------------

_SEPARATOR = "\n\n"
#: What the reconstruction probe asks of the model before the context is repeated.
RECONSTRUCT_PROMPT = "Repeat the previous context exactly."


class Pipeline:
    """``pipe(context, question=...)`` or ``pipe(context, questions=[...])``: see ``pipeline``."""

    def __init__(self, model: Any, tokenizer: Any, *, client: Optional[Client] = None, policy: Optional[str] = None,
                 rho: Optional[float] = None, preset: Optional[str] = None, probe: str = "context",
                 max_new_tokens: int = 128, **options: Any) -> None:
        if probe not in PROBES:
            raise ValueError(f"probe: expected one of {', '.join(map(repr, PROBES))}, got {probe!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.client = client
        self.policy, self.rho, self.preset, self.probe, self.options = policy, rho, preset, probe, options
        self.max_new_tokens = max_new_tokens
        self.cache: Optional[CompressedCache] = None

    def split(self, context: str, questions: Sequence[str]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The context's token ids and each question's (what follows the context in the prompt)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            marker = "\x00medakv-question\x00"
            text = tok.apply_chat_template([{"role": "user", "content": context + _SEPARATOR + marker}],
                                           add_generation_prompt=True, tokenize=False)
            if text.count(marker) != 1:
                raise ValueError("the tokenizer's chat template does not keep the user's text as given")
            head, tail = text.split(marker)
            if not head.endswith(_SEPARATOR):
                raise ValueError("the tokenizer's chat template does not keep the user's text as given")
            context_ids = tok(head[: -len(_SEPARATOR)], add_special_tokens=False, return_tensors="pt").input_ids
            rests = [_SEPARATOR + q + tail for q in questions]
        else:
            context_ids = tok(context, return_tensors="pt").input_ids
            rests = [_SEPARATOR + q + _SEPARATOR for q in questions]
        question_ids = [tok(r, add_special_tokens=False, return_tensors="pt").input_ids for r in rests]
        return context_ids, question_ids

    def reconstruct_ids(self, context: str) -> torch.Tensor:
        """The reconstruction probe's ids: ``RECONSTRUCT_PROMPT`` after the context in the user's turn, the end of
        that turn and the model's answer header (the chat template's, as for a question), then the context's
        text once more: the model is asked to repeat the context, and repeats it."""
        tok = self.tokenizer
        after = _SEPARATOR
        if getattr(tok, "chat_template", None):
            marker = "\x00medakv-question\x00"
            text = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                           tokenize=False)
            after = text.split(marker)[1]
        ids: torch.Tensor = tok(_SEPARATOR + RECONSTRUCT_PROMPT + after + context, add_special_tokens=False,
                                return_tensors="pt").input_ids
        return ids

    @torch.no_grad()
    def __call__(self, context: str, question: Optional[str] = None, *, questions: Optional[Sequence[str]] = None,
                 max_new_tokens: Optional[int] = None, **generate_kwargs: Any) -> Dict[str, Any]:
        if (question is None) == (questions is None):
            raise ValueError("pass question= or questions=, one of them")
        asked = [question] if question is not None else list(questions or [])
        if not asked or not all(isinstance(q, str) for q in asked):
            raise ValueError("questions: expected one or more strings")
        if not isinstance(context, str) or not context:
            raise ValueError("context: expected a non-empty string")
        context_ids, question_ids = self.split(context, asked)

        def compressed(probe_ids: Optional[torch.Tensor]) -> CompressedCache:
            return compress(self.model, context_ids, client=self.client, policy=self.policy, rho=self.rho,
                            preset=self.preset, probe=self.probe, probe_ids=probe_ids, **self.options)

        if self.probe != "question":
            self.cache = compressed(self.reconstruct_ids(context) if self.probe == "reconstruct" else None)
        answers = []
        for q in question_ids:
            if self.probe == "question":
                self.cache = compressed(q)  # one compression per question, scored by its rows
            assert self.cache is not None
            device = context_ids.device if self.cache.context_ids is None else self.cache.context_ids.device
            ids = torch.cat([context_ids.to(device), q.to(device)], dim=-1)
            gen: Dict[str, Any] = dict(max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False)
            gen.update(generate_kwargs)
            gen[_cache_argument(self.model)] = self.cache.copy()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
            answers.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return {"answer": answers[0]} if question is not None else {"answers": answers}


def pipeline(model: Any, tokenizer: Any, *, client: Optional[Client] = None, policy: Optional[str] = None,
             rho: Optional[float] = None, preset: Optional[str] = None, probe: str = "context",
             max_new_tokens: int = 128, **options: Any) -> Pipeline:
    """Question answering over a compressed context, in the manner of kvpress's pipeline.

    ::

        pipe = medakv.hf.pipeline(model, tokenizer, rho=0.25)
        pipe(context, question="...")["answer"]
        pipe(context, questions=["...", "..."])["answers"]

    The prompt is the tokenizer's chat template around one user turn, the
    context then the question (without a template: the context, then the
    question). The context is prefilled and compressed once
    (``medakv.hf.compress`` with these ``client``, ``policy``, ``rho``,
    ``preset`` and options); each question is decoded greedily by
    ``model.generate`` over a copy of the compressed cache.
    ``pipe.cache`` is the last compressed cache (its ``full_nbytes`` and
    ``context_nbytes`` say what the compression saved).

    ``probe`` (``compress``'s): ``"context"`` (default) scores the cache with
    the context's own rows; ``"reconstruct"`` with a pass that asks the model
    to repeat the context (``RECONSTRUCT_PROMPT``; costs about three context
    prefills, keeps the answers of questions asked later best);
    ``"question"`` compresses the context once per question, scored by that
    question's rows.
    """
    return Pipeline(model, tokenizer, client=client, policy=policy, rho=rho, preset=preset, probe=probe,
                    max_new_tokens=max_new_tokens, **options)
