"""A cache given as per-layer tensors, checked and laid out for the wire.

Every check the server makes on a header (service/server/convert.cc,
service/compress/pipeline.cc ValidateCacheInput) is made here first, so a
bad argument raises ValueError or TypeError naming it before a byte is sent.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np

from . import _arrays
from .types import ModalitySpan
from .v1 import medakv_pb2 as pb

# The server's limits (service/server/convert.h).
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_TOKENS = 1 << 24

_DTYPE_PROTO = {"float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16, "float32": pb.DTYPE_FLOAT32}
_LAYOUT_PROTO = {"hnd": pb.LAYOUT_HND, "nhd": pb.LAYOUT_NHD}
_MODALITY_PROTO = {"text": pb.MODALITY_TEXT, "visual": pb.MODALITY_VISUAL}


@dataclass
class PreparedCache:
    """A checked cache: the header fields and the tensors in the order they are sent."""

    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    tokens: int
    dtype: str
    layout: str
    spans: List[ModalitySpan]
    stats: "pb.StatsForm"
    q_tokens: int = 0
    has_query_positions: bool = False
    has_query_outside_lse: bool = False
    score_heads: int = 0
    # (layer, pb.TensorKind, bytes) in send order: per layer key, value, then its statistics.
    pieces: List[Tuple[int, "pb.TensorKind", memoryview]] = field(default_factory=list)
    output: _arrays.Output = field(default_factory=_arrays.Output)

    def shape(self) -> pb.CacheShape:
        return pb.CacheShape(
            layers=self.layers, kv_heads=self.kv_heads, q_heads=self.q_heads, head_dim=self.head_dim,
            tokens=self.tokens, dtype=_DTYPE_PROTO[self.dtype], layout=_LAYOUT_PROTO[self.layout],
            modality=[pb.ModalitySpan(start=s.start, length=s.length, modality=_MODALITY_PROTO[s.modality])
                      for s in self.spans])

    def kv_shape(self, tokens: int) -> Tuple[int, int, int]:
        """Dims of a key or value tensor holding ``tokens`` tokens per head, in this cache's layout."""
        if self.layout == "hnd":
            return (self.kv_heads, tokens, self.head_dim)
        return (tokens, self.kv_heads, self.head_dim)



def _query_position_limit(tokens: int) -> int:
    """Query rows may stand after the cache (probes: a question asked after it, a pass that reconstructs it):
    positions (and the number of rows) up to 2 x tokens + 65536, as the server takes them."""
    return 2 * tokens + 65536

def check_layout(layout: object) -> str:
    if not isinstance(layout, str):
        raise TypeError(f"layout: expected 'hnd' or 'nhd', got {type(layout).__name__}")
    key = layout.strip().lower()
    if key not in _LAYOUT_PROTO:
        raise ValueError(f"layout: expected 'hnd' ([heads, tokens, head_dim]) or 'nhd' ([tokens, heads, head_dim]), "
                         f"got {layout!r}")
    return key


def _layer_list(x: object, what: str, layers: Optional[int] = None) -> List[Any]:
    """A per-layer sequence: a list or tuple of tensors, or one tensor stacked over layers (dim 0)."""
    if _arrays.is_tensor(x):
        ndim = len(x.shape)  # type: ignore[attr-defined]
        if ndim != 4:
            raise ValueError(f"{what}: a single tensor must be 4-D [layers, ...] (got {ndim}-D); "
                             "or pass a list with one tensor per layer")
        items = [x[i] for i in range(int(x.shape[0]))]  # type: ignore[index,attr-defined]
    elif isinstance(x, (list, tuple)):
        items = list(x)
    else:
        raise TypeError(f"{what}: expected a list of per-layer tensors (numpy.ndarray or torch.Tensor), "
                        f"got {type(x).__name__}")
    if not items:
        raise ValueError(f"{what}: the cache has no layer (an empty list)")
    if layers is not None and len(items) != layers:
        raise ValueError(f"{what}: {len(items)} layers, but keys has {layers}")
    return items


def _dims(layout: str, shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """(heads, tokens, head_dim) of a rank-3 tensor."""
    if layout == "hnd":
        return shape[0], shape[1], shape[2]
    return shape[1], shape[0], shape[2]


def _order(layout: str) -> str:
    return "[heads, tokens, head_dim]" if layout == "hnd" else "[tokens, heads, head_dim]"


def _check_dim(name: str, value: int, limit: int, what: str) -> None:
    if value <= 0:
        raise ValueError(f"{what}: {name} is {value}, must be > 0")
    if value > limit:
        raise ValueError(f"{what}: {name} is {value}, over the server's limit of {limit}")


def modality_spans(modality: object, tokens: int) -> List[ModalitySpan]:
    """Spans from ``modality``: None, per-token 0/1 flags (1 visual), or spans.

    Spans are ``ModalitySpan`` objects or ``(start, length)`` /
    ``(start, length, "visual" | "text")`` tuples; they must lie inside
    ``[0, tokens)``, have a positive length and not overlap.
    """
    if modality is None:
        return []
    if _arrays.is_tensor(modality) or (isinstance(modality, (list, tuple)) and modality and all(
            isinstance(v, (numbers.Integral, np.bool_)) for v in modality)):
        flags = _flags(modality, tokens)
        spans = []
        t = 0
        while t < tokens:
            if not flags[t]:
                t += 1
                continue
            end = t
            while end < tokens and flags[end]:
                end += 1
            spans.append(ModalitySpan(t, end - t, "visual"))
            t = end
        return spans
    if not isinstance(modality, (list, tuple)):
        raise TypeError("modality: expected per-token flags (an array or list of 0/1, 1 visual) or a list of "
                        f"spans ((start, length) tuples or ModalitySpan), got {type(modality).__name__}")
    given: List[Tuple[int, int, str, int]] = []  # start, length, modality, index
    for i, s in enumerate(modality):
        what = f"modality[{i}]"
        if isinstance(s, ModalitySpan):
            start, length, kind = s.start, s.length, s.modality
        elif isinstance(s, (tuple, list)) and len(s) in (2, 3):
            start, length = s[0], s[1]
            kind = s[2] if len(s) == 3 else "visual"
        else:
            raise TypeError(f"{what}: expected a (start, length) tuple or a ModalitySpan, got {s!r}")
        for name, v in (("start", start), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{what}.{name}: expected an int, got {type(v).__name__}")
        start, length = int(start), int(length)
        if not isinstance(kind, str) or kind.lower() not in _MODALITY_PROTO:
            raise ValueError(f"{what}.modality: expected 'visual' or 'text', got {kind!r}")
        if not (0 <= start < tokens):
            raise ValueError(f"{what}.start must be in [0, tokens={tokens}), got {start}")
        if length <= 0:
            raise ValueError(f"{what}.length must be > 0, got {length}")
        if length > tokens - start:
            raise ValueError(f"{what} (start {start}, length {length}) runs past tokens={tokens}")
        given.append((start, length, kind.lower(), i))
    ordered = sorted(given)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur[0] < prev[0] + prev[1]:
            a, b = sorted((prev[3], cur[3]))
            raise ValueError(f"modality[{b}] (start {given[b][0]}, length {given[b][1]}) overlaps modality[{a}] "
                             f"(start {given[a][0]}, length {given[a][1]}); spans must not overlap")
    return [ModalitySpan(start, length, kind) for start, length, kind, _ in given]


def _flags(modality: object, tokens: int) -> np.ndarray:
    if _arrays.is_torch_tensor(modality):
        modality = modality.detach().to("cpu").numpy()  # type: ignore[attr-defined]
    flags = np.asarray(modality)
    if flags.ndim != 1 or flags.shape[0] != tokens:
        hint = "; one span is written [(start, length)]" if flags.shape == (2,) else ""
        raise ValueError(f"modality: per-token flags must be 1-D with one entry per token ({tokens}), "
                         f"got shape {tuple(flags.shape)}{hint}")
    if flags.dtype.kind not in "biu":
        raise TypeError(f"modality: per-token flags must be bool or integer (0 text, 1 visual), got {flags.dtype}")
    bad = np.flatnonzero((flags != 0) & (flags != 1))
    if bad.size:
        raise ValueError(f"modality[{int(bad[0])}] is {flags[bad[0]]} (expected 0 for text or 1 for visual)")
    return flags.astype(bool)


def _positions_list(query_positions: object, layers: int) -> List[Any]:
    """One positions vector per layer: a 1-D vector (every layer), a 2-D [layers, q_tokens] tensor, or a list."""
    if _arrays.is_tensor(query_positions):
        shape = tuple(query_positions.shape)  # type: ignore[attr-defined]
        if len(shape) == 1:
            return [query_positions] * layers
        if len(shape) == 2:
            if shape[0] != layers:
                raise ValueError(f"query_positions: {shape[0]} layers, but keys has {layers}")
            return [query_positions[i] for i in range(layers)]  # type: ignore[index]
        raise ValueError(f"query_positions: expected 1-D [q_tokens] (every layer) or 2-D [layers, q_tokens], "
                         f"got {len(shape)}-D")
    if isinstance(query_positions, (list, tuple)) and query_positions and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in query_positions):
        return [query_positions] * layers  # one list of ints for every layer
    if isinstance(query_positions, (list, tuple)):
        if len(query_positions) != layers:
            raise ValueError(f"query_positions: {len(query_positions)} layers, but keys has {layers}")
        return list(query_positions)
    raise TypeError("query_positions: expected an integer vector [q_tokens] for every layer, or one per layer, "
                    f"got {type(query_positions).__name__}")


def _outside_list(query_outside_lse: object, layers: int) -> List[Any]:
    """One [q_heads, q_tokens] tensor per layer: a list, or one 3-D [layers, q_heads, q_tokens] tensor."""
    if _arrays.is_tensor(query_outside_lse):
        shape = tuple(query_outside_lse.shape)  # type: ignore[attr-defined]
        if len(shape) != 3:
            raise ValueError("query_outside_lse: a single tensor must be 3-D [layers, q_heads, q_tokens] "
                             f"(got {len(shape)}-D); or pass a list with one tensor per layer")
        if shape[0] != layers:
            raise ValueError(f"query_outside_lse: {shape[0]} layers, but keys has {layers}")
        return [query_outside_lse[i] for i in range(layers)]  # type: ignore[index]
    return _layer_list(query_outside_lse, "query_outside_lse", layers)


def prepare_cache(keys: object, values: object, queries: object = None, *, query_positions: object = None,
                  query_outside_lse: object = None, scores: object = None, entropy: object = None,
                  modality: object = None, layout: str = "hnd", need_stats: bool) -> PreparedCache:
    """Checks a cache given as per-layer tensors and lays it out for the wire.

    ``need_stats``: Compress needs queries or scores; PutCache may store keys
    and values alone.
    """
    layout = check_layout(layout)
    key_list = _layer_list(keys, "keys")
    layers = len(key_list)
    value_list = _layer_list(values, "values", layers)
    if layers > MAX_LAYERS:
        raise ValueError(f"keys: {layers} layers, over the server's limit of {MAX_LAYERS}")

    pieces: List[Tuple[int, "pb.TensorKind", memoryview]] = []
    per_layer: List[List[Tuple["pb.TensorKind", memoryview]]] = [[] for _ in range(layers)]
    first = None
    for what, items, kind in (("keys", key_list, pb.TENSOR_KIND_KEY), ("values", value_list, pb.TENSOR_KIND_VALUE)):
        for i, x in enumerate(items):
            w = _arrays.as_kv(x, f"{what}[{i}]")
            if len(w.shape) != 3:
                raise ValueError(f"{what}[{i}]: shape {w.shape} is not 3-D {_order(layout)} (layout {layout!r})")
            if first is None:
                first = w
                kv_heads, tokens, head_dim = _dims(layout, w.shape)
                _check_dim("kv_heads", kv_heads, MAX_HEADS, "keys[0]")
                _check_dim("tokens", tokens, MAX_TOKENS, "keys[0]")
                _check_dim("head_dim", head_dim, MAX_HEAD_DIM, "keys[0]")
            elif w.dtype != first.dtype:
                raise TypeError(f"{what}[{i}]: dtype {w.dtype} differs from keys[0] ({first.dtype}); "
                                "keys and values of every layer share one dtype")
            elif w.shape != first.shape:
                raise ValueError(f"{what}[{i}]: shape {w.shape} differs from keys[0] {first.shape}; keys and "
                                 "values of every layer have the same shape")
            per_layer[i].append((kind, w.data()))
    assert first is not None
    dtype = first.dtype
    kv_heads, tokens, head_dim = _dims(layout, first.shape)

    if queries is not None and scores is not None:
        raise ValueError("give either queries (the server computes the statistics) or scores and entropy "
                         "(precomputed), not both")
    q_heads = q_tokens = score_heads = 0
    has_positions = has_outside = False
    if queries is not None:
        if entropy is not None:
            raise ValueError("entropy goes with precomputed scores (scores=...); with queries the server "
                             "computes it")
        query_list = _layer_list(queries, "queries", layers)
        q_first = None
        for i, x in enumerate(query_list):
            what = f"queries[{i}]"
            w = _arrays.as_kv(x, what)
            if w.dtype != dtype:
                raise TypeError(f"{what}: dtype {w.dtype} differs from the keys' ({dtype}); queries are sent "
                                "in the keys' dtype")
            if len(w.shape) != 3:
                raise ValueError(f"{what}: shape {w.shape} is not 3-D {_order(layout)} (layout {layout!r})")
            if q_first is None:
                q_first = w
                q_heads, q_tokens, q_dim = _dims(layout, w.shape)
                if q_dim != head_dim:
                    raise ValueError(f"{what}: head_dim {q_dim} differs from the keys' ({head_dim})")
                if q_heads <= 0 or q_heads % kv_heads != 0 or q_heads > MAX_HEADS:
                    raise ValueError(f"{what}: {q_heads} query heads, expected a positive multiple of kv_heads "
                                     f"({kv_heads}) up to {MAX_HEADS}")
                limit = _query_position_limit(tokens)
                if not (1 <= q_tokens <= limit):
                    raise ValueError(f"{what}: q_tokens must be in [1, 2 x tokens + 65536 = {limit}], got {q_tokens}")
                if q_tokens > tokens and query_positions is None:
                    raise ValueError(f"{what}: {q_tokens} query rows for {tokens} tokens: rows after the cache "
                                     "(probes) need query_positions (the default is the cache's last rows)")
            elif w.shape != q_first.shape:
                raise ValueError(f"{what}: shape {w.shape} differs from queries[0] {q_first.shape}; every layer "
                                 "has the same query shape")
            per_layer[i].append((pb.TENSOR_KIND_QUERY, w.data()))
        if query_positions is not None:
            has_positions = True
            for i, p in enumerate(_positions_list(query_positions, layers)):
                what = f"query_positions[{i}]"
                pos = _arrays.as_int32(p, what)
                if pos.shape != (q_tokens,):
                    raise ValueError(f"{what}: shape {tuple(pos.shape)}, expected [q_tokens={q_tokens}]")
                limit = _query_position_limit(tokens)
                bad = np.flatnonzero((pos < 0) | (pos >= limit))
                if bad.size:
                    raise ValueError(f"{what}[{int(bad[0])}] is {int(pos[bad[0]])}, outside "
                                     f"[0, 2 x tokens + 65536 = {limit})")
                per_layer[i].append((pb.TENSOR_KIND_QUERY_POSITIONS, pos.view(np.uint8).data))
        if query_outside_lse is not None:
            has_outside = True
            for i, x in enumerate(_outside_list(query_outside_lse, layers)):
                what = f"query_outside_lse[{i}]"
                o = _arrays.as_float32(x, what)
                if o.shape != (q_heads, q_tokens):
                    raise ValueError(f"{what}: shape {tuple(o.shape)}, expected [q_heads={q_heads}, "
                                     f"q_tokens={q_tokens}]")
                refused = np.argwhere(np.isnan(o) | (o == np.inf))
                if refused.size:
                    h, r = (int(v) for v in refused[0])
                    raise ValueError(f"{what}[{h}, {r}] is {float(o[h, r])} (expected finite, or -inf for a row "
                                     "that attends nothing outside the cache)")
                per_layer[i].append((pb.TENSOR_KIND_QUERY_OUTSIDE_LSE, o.reshape(-1).view(np.uint8).data))
        stats = pb.STATS_FORM_QUERIES
    elif scores is not None:
        if query_positions is not None or query_outside_lse is not None:
            raise ValueError("query_positions and query_outside_lse go with queries; precomputed scores carry no "
                             "query rows")
        if entropy is None:
            raise ValueError("scores need entropy: one float per layer, the layer's E_l")
        score_list = _layer_list_2d(scores, layers)
        entropies = _entropy_list(entropy, layers)
        for i, x in enumerate(score_list):
            what = f"scores[{i}]"
            s = _arrays.as_float32(x, what)
            if s.ndim != 2 or s.shape[1] != tokens:
                raise ValueError(f"{what}: shape {tuple(s.shape)}, expected [score_heads, tokens={tokens}]")
            if i == 0:
                score_heads = int(s.shape[0])
                if score_heads <= 0 or score_heads % kv_heads != 0 or score_heads > MAX_HEADS:
                    raise ValueError(f"{what}: {score_heads} heads, expected kv_heads ({kv_heads}) or q_heads "
                                     f"(a multiple of kv_heads, up to {MAX_HEADS})")
            elif s.shape[0] != score_heads:
                raise ValueError(f"{what}: {s.shape[0]} heads differs from scores[0] ({score_heads})")
            per_layer[i].append((pb.TENSOR_KIND_SCORES, s.reshape(-1).view(np.uint8).data))
            e = np.array([entropies[i]], dtype="<f4")
            per_layer[i].append((pb.TENSOR_KIND_ENTROPY, e.view(np.uint8).data))
        q_heads = max(kv_heads, score_heads)  # as medakv compress reads a file
        stats = pb.STATS_FORM_PRECOMPUTED
    else:
        if query_positions is not None or query_outside_lse is not None or entropy is not None:
            raise ValueError("query_positions and query_outside_lse go with queries, entropy with scores; neither "
                             "was given")
        if need_stats:
            raise ValueError("compress needs attention statistics: queries=[...] (per-layer query rows; the "
                             "server computes scores and entropy) or scores=[...] with entropy=[...]")
        stats = pb.STATS_FORM_NONE

    for i, layer in enumerate(per_layer):
        pieces.extend((i, kind, data) for kind, data in layer)
    return PreparedCache(layers=layers, kv_heads=kv_heads, q_heads=q_heads, head_dim=head_dim, tokens=tokens,
                         dtype=dtype, layout=layout, spans=modality_spans(modality, tokens), stats=stats,
                         q_tokens=q_tokens, has_query_positions=has_positions,
                         has_query_outside_lse=has_outside, score_heads=score_heads,
                         pieces=pieces, output=first.output)


def _layer_list_2d(scores: object, layers: int) -> List[Any]:
    if _arrays.is_tensor(scores):
        ndim = len(scores.shape)  # type: ignore[attr-defined]
        if ndim != 3:
            raise ValueError(f"scores: a single tensor must be 3-D [layers, score_heads, tokens] (got {ndim}-D); "
                             "or pass a list with one tensor per layer")
        items = [scores[i] for i in range(int(scores.shape[0]))]  # type: ignore[index,attr-defined]
        if len(items) != layers:
            raise ValueError(f"scores: {len(items)} layers, but keys has {layers}")
        return items
    return _layer_list(scores, "scores", layers)


def _entropy_list(entropy: object, layers: int) -> List[float]:
    if _arrays.is_torch_tensor(entropy):
        entropy = entropy.detach().to("cpu").numpy()  # type: ignore[attr-defined]
    if isinstance(entropy, np.ndarray):
        if entropy.ndim != 1:
            raise ValueError(f"entropy: expected one float per layer (1-D), got shape {tuple(entropy.shape)}")
        entropy = entropy.tolist()
    if not isinstance(entropy, (list, tuple)):
        raise TypeError(f"entropy: expected one float per layer (a list or 1-D array), got {type(entropy).__name__}")
    if len(entropy) != layers:
        raise ValueError(f"entropy: {len(entropy)} values, but keys has {layers} layers")
    out = []
    for i, e in enumerate(entropy):
        if isinstance(e, bool) or not isinstance(e, numbers.Real):
            raise TypeError(f"entropy[{i}]: expected a number, got {type(e).__name__}")
        with np.errstate(over="ignore"):
            v = float(np.float32(e))
        if not math.isfinite(v):
            raise ValueError(f"entropy[{i}] is not finite ({e})")
        out.append(v)
    return out

