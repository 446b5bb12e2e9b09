"""What the client returns: compressed layers, summaries, cache-store records.

Tensors in results are NumPy arrays, or torch tensors when the request's
tensors were torch tensors (see ``Client.compress``). Their dims follow the
request's layout:

* ``key``, ``value``: ``[kv_heads, kept, head_dim]`` (HND) or
  ``[kept, kv_heads, head_dim]`` (NHD), in the cache's dtype;
* ``positions``: int32 ``[kv_heads, kept]``, the kept tokens' original
  positions, ascending per head; where the heads of a layer keep different
  numbers of tokens (amber's ``layer_budget="global"``) a shorter head ends
  in padding rows at position -1 with zero keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Tuple

from .v1 import medakv_pb2 as pb

__all__ = [
    "CacheInfo",
    "CacheShape",
    "CompressCacheResult",
    "CompressResult",
    "CompressSummary",
    "LayerInfo",
    "LayerResult",
    "ModalitySpan",
    "ServerStats",
    "StageTimes",
    "StoredCache",
    "TierStats",
]


@dataclass(frozen=True)
class ModalitySpan:
    """Tokens ``[start, start + length)`` are of ``modality`` ("visual" or "text").

    Tokens outside every span are text, so a request usually lists only its
    visual spans (images, video frames).
    """

    start: int
    length: int
    modality: str = "visual"


@dataclass(frozen=True)
class LayerInfo:
    """Per compressed layer: ``budget`` (B_l, tokens kept per kv head), ``entropy`` (E_l), ``alpha``."""

    layer: int
    budget: int
    entropy: float
    alpha: float


@dataclass
class LayerResult:
    """One compressed layer: its tensors and its budget (B_l), entropy (E_l) and alpha_l.

    ``key`` and ``value`` hold ``budget`` tokens per kv head; ``positions``
    says which original token each kept (or merged-into) row is.
    """

    layer: int
    key: Any
    value: Any
    positions: Any
    budget: int
    entropy: float
    alpha: float


@dataclass(frozen=True)
class StageTimes:
    """Server-side seconds per stage of a compression."""

    receive_seconds: float = 0.0
    statistics_seconds: float = 0.0
    allocate_seconds: float = 0.0
    select_merge_seconds: float = 0.0
    send_seconds: float = 0.0


@dataclass(frozen=True)
class CompressSummary:
    """What a compression did: tokens (summed over layers, per kv head) and tensor bytes in and out."""

    tokens_in: int
    tokens_kept: int
    bytes_in: int
    bytes_out: int
    times: StageTimes
    backend: str
    #: The policy the server ran: its kind and every option (rho included),
    #: and in ``policy.preset`` the server preset that gave it ("" when none).
    policy: pb.Policy = field(default_factory=pb.Policy)


@dataclass
class CompressResult:
    """The result of ``Client.compress``: one ``LayerResult`` per layer, in layer order."""

    layers: List[LayerResult]
    summary: CompressSummary
    dtype: str  # "float16" | "bfloat16" | "float32"
    layout: str  # "hnd" | "nhd"
    kv_heads: int
    head_dim: int
    tokens: int  # tokens per layer before compression
    #: Whether the tensors went through shared memory (a server on this host, ``Client(shared_memory=...)``).
    shared_memory: bool = False

    @property
    def tokens_kept(self) -> int:
        """Tokens kept, summed over layers (per kv head)."""
        return sum(layer.budget for layer in self.layers)

    @property
    def kept_fraction(self) -> float:
        """Kept tokens over cached tokens, e.g. 0.2 for rho 0.2."""
        return self.tokens_kept / (len(self.layers) * self.tokens)

    @property
    def kv_bytes_in(self) -> int:
        """Bytes of keys and values before compression."""
        return 2 * len(self.layers) * self.tokens * self.kv_heads * self.head_dim * _itemsize(self.dtype)

    @property
    def kv_bytes_out(self) -> int:
        """Bytes of the compressed keys and values."""
        return 2 * self.tokens_kept * self.kv_heads * self.head_dim * _itemsize(self.dtype)


@dataclass(frozen=True)
class CacheShape:
    """The dimensions of a cache as the server describes it."""

    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    tokens: int
    dtype: str
    layout: str
    modality: Tuple[ModalitySpan, ...] = ()


@dataclass(frozen=True)
class CacheInfo:
    """A stored cache: its id, shape, bytes held, tokens per layer, and whether (and how) it was compressed."""

    cache_id: str
    shape: CacheShape
    bytes: int
    layer_tokens: Tuple[int, ...]
    compressed: bool
    policy: str  # the policy that compressed it ("" if none)
    created_unix_ms: int
    expires_unix_ms: int  # 0: never
    tier: str  # "host" or "device"


@dataclass
class CompressCacheResult:
    """The result of ``Client.compress_cache``: the entry after compression, per-layer budgets, the summary."""

    info: CacheInfo
    layers: List[LayerInfo]
    summary: CompressSummary


@dataclass
class StoredCache:
    """The result of ``Client.get_cache``: the entry's info and the layers asked for."""

    info: CacheInfo
    layers: List[LayerResult] = field(default_factory=list)
    #: Whether the layers came through shared memory (a server on this host).
    shared_memory: bool = False


@dataclass(frozen=True)
class TierStats:
    """One tier of the server's cache store."""

    tier: str
    capacity_bytes: int
    used_bytes: int
    entries: int
    evictions: int


@dataclass(frozen=True)
class ServerStats:
    """The answer of ``Client.stats``."""

    tiers: Tuple[TierStats, ...]
    inflight_compressions: int
    backend: str
    version: str
    shared_memory_regions: int
    tenant: str = ""  # the caller's tenant ("" when the server does not authenticate)


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2
