"""``medakv.Client``: the gRPC client of medakv-server.

One ``Client`` holds one channel to one server and may be shared by threads.
Every method checks its arguments first and raises ``ValueError`` or
``TypeError`` before anything is sent; a call that fails on the way or on
the server raises ``MedakvError`` carrying the gRPC status.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from . import _arrays, _health, _shm
from ._cache import PreparedCache, prepare_cache
from .errors import MedakvError
from .options import build_policy
from .types import (
    CacheInfo,
    CacheShape,
    CompressCacheResult,
    CompressResult,
    CompressSummary,
    LayerInfo,
    LayerResult,
    ModalitySpan,
    ServerStats,
    StageTimes,
    StoredCache,
    TierStats,
)
from .v1 import medakv_pb2 as pb
from .v1 import medakv_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import PolicyOptions

__all__ = ["Client", "DEFAULT_CHUNK_BYTES"]

#: Request chunks: the tensors travel in pieces of at most this many bytes,
#: well under the server's --max_message_bytes (16 MiB by default).
DEFAULT_CHUNK_BYTES = 4 << 20
# Bounds the server puts on max_response_chunk_bytes (service/server/convert.h).
_MIN_RESPONSE_CHUNK = 1 << 10
_MAX_RESPONSE_CHUNK = 64 << 20

_CACHE_ID = re.compile(r"[A-Za-z0-9._:/-]{1,256}")
_DTYPE_NAME = {pb.DTYPE_FLOAT16: "float16", pb.DTYPE_BFLOAT16: "bfloat16", pb.DTYPE_FLOAT32: "float32"}
_LAYOUT_NAME = {pb.LAYOUT_UNSPECIFIED: "hnd", pb.LAYOUT_HND: "hnd", pb.LAYOUT_NHD: "nhd"}
_TENSOR_NAME: Dict[int, str] = {pb.TENSOR_KIND_KEY: "key", pb.TENSOR_KIND_VALUE: "value", pb.TENSOR_KIND_POSITIONS: "positions"}
_TIER_PROTO: Dict[str, "pb.CacheTier"] = {"auto": pb.CACHE_TIER_AUTO, "host": pb.CACHE_TIER_HOST,
                                          "device": pb.CACHE_TIER_DEVICE}


class Client:
    """A connection to one medakv server.

    Args:
        target: the server's ``host:port`` (any gRPC target: ``dns:///...``,
            ``unix:/path``, ...).
        timeout: default deadline of every call, in seconds (None: no
            deadline). Each method's ``timeout`` overrides it.
        chunk_bytes: default request chunk size; keep it under the server's
            ``--max_message_bytes`` (16 MiB by default).
        response_chunk_bytes: result chunk size asked of the server, in
            [1 KiB, 64 MiB]; 0 lets the server choose (4 MiB).
        wait_for_ready: wait (up to the deadline) for the server to become
            reachable instead of failing at once with UNAVAILABLE.
        credentials: ``grpc.ssl_channel_credentials(...)`` for TLS (mutual
            TLS: with ``private_key`` and ``certificate_chain``); None for a
            plaintext channel.
        token: bearer token for a server with ``--auth_tokens_file``, sent
            as ``authorization: Bearer TOKEN`` metadata with every call
            (printable ASCII without spaces); None: none. Use TLS with it
            unless the network is trusted.
        channel_options: extra gRPC channel arguments, e.g.
            ``[("grpc.lb_policy_name", "round_robin")]``.
        shared_memory: "auto" (default): ``compress`` and ``put_cache`` send
            their tensors through POSIX shared memory (docs/shared_memory.md)
            when the target is on this host (loopback, ``localhost``, a Unix
            socket), and fall back to bytes on the socket when a region
            cannot be made or registered; "always": try it with any target
            (a node-local server reached through a pod IP, started with
            ``--shm_allow_remote``); "off": bytes only.
        shared_memory_pool_bytes: idle registered regions kept (default
            1 GiB); also the largest call that uses shared memory.

    The channel accepts messages of any size (the server's limits apply).
    Use it as a context manager, or call ``close()``.
    """

    def __init__(self, target: str, *, timeout: Optional[float] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 response_chunk_bytes: int = 0, wait_for_ready: bool = False,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 channel_options: Sequence[Tuple[str, Any]] = (), token: Optional[str] = None,
                 shared_memory: str = "auto", shared_memory_pool_bytes: int = 1 << 30) -> None:
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"target: expected 'host:port', got {target!r}")
        self._target = target
        self._timeout = _check_timeout(timeout)
        self._chunk_bytes = _check_chunk_bytes(chunk_bytes)
        self._response_chunk_bytes = _check_response_chunk_bytes(response_chunk_bytes)
        if not isinstance(wait_for_ready, bool):
            raise TypeError(f"wait_for_ready: expected a bool, got {type(wait_for_ready).__name__}")
        self._wait_for_ready = wait_for_ready
        self._metadata: Tuple[Tuple[str, str], ...] = ()
        if token is not None:
            if not isinstance(token, str):
                raise TypeError(f"token: expected a str, got {type(token).__name__}")
            if not token or any(not ("!" <= c <= "~") for c in token):
                raise ValueError("token: expected printable ASCII without spaces")
            self._metadata = (("authorization", f"Bearer {token}"),)
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                   *channel_options]
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.MedakvStub(self._channel)  # type: ignore[no-untyped-call]
        if shared_memory not in _shm.MODES:
            raise ValueError(f"shared_memory: expected one of {', '.join(_shm.MODES)}, got {shared_memory!r}")
        if isinstance(shared_memory_pool_bytes, bool) or not isinstance(shared_memory_pool_bytes, int) \
                or shared_memory_pool_bytes < 0:
            raise ValueError(f"shared_memory_pool_bytes: expected an int >= 0, got {shared_memory_pool_bytes!r}")
        self._shm: Optional[_shm.Pool] = None
        if shared_memory == "always" or (shared_memory == "auto" and _shm.is_local_target(target)):
            self._shm = _shm.Pool(self._stub, self._metadata, shared_memory_pool_bytes, self._shm_prefix)
        self._shm_name_prefix: Optional[str] = None
        self._health_check = self._channel.unary_unary(
            _health.CHECK_METHOD, request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString)

    # ---- lifetime ------------------------------------------------------------

    @property
    def target(self) -> str:
        """The server's address as given."""
        return self._target

    def close(self) -> None:
        """Closes the channel (calls in flight are cancelled) and releases the shared-memory regions."""
        if self._shm is not None:
            self._shm.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"medakv.Client({self._target!r})"

    # ---- health ----------------------------------------------------------------

    def health(self, service: str = "", *, timeout: Optional[float] = 5.0) -> str:
        """``grpc.health.v1.Health/Check``: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN".

        ``service`` "" asks about the whole server. A server that cannot be
        reached raises ``MedakvError`` (UNAVAILABLE), it does not return a
        status.
        """
        if not isinstance(service, str):
            raise TypeError(f"service: expected a str, got {type(service).__name__}")
        timeout = _check_timeout(timeout)
        try:
            response = self._health_check(_health.HealthCheckRequest(service=service), timeout=timeout,
                                          wait_for_ready=self._wait_for_ready, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e, "Health/Check") from None
        return _health.status_name(response)

    # ---- Compress ----------------------------------------------------------------

    def compress(self, keys: Any, values: Any, queries: Any = None, *, query_positions: Any = None,
                 query_outside_lse: Any = None, scores: Any = None, entropy: Any = None, modality: Any = None, layout: str = "hnd",
                 policy: Optional[str] = None, rho: Optional[float] = None, preset: Optional[str] = None,
                 timeout: Optional[float] = None,
                 chunk_bytes: Optional[int] = None, response_chunk_bytes: Optional[int] = None,
                 **options: "Unpack[PolicyOptions]") -> CompressResult:
        """Compresses one prompt's KV cache on the server; nothing is stored there.

        Args:
            keys, values: one tensor per layer (a list, or one tensor stacked
                over a leading layer dim), every layer the same shape
                ``[kv_heads, tokens, head_dim]`` (layout "hnd") or
                ``[tokens, kv_heads, head_dim]`` ("nhd") and dtype: NumPy
                float16 / float32 / bfloat16 (``ml_dtypes.bfloat16``, or
                ``uint16`` holding bfloat16 bit patterns), or torch
                float16 / bfloat16 / float32 tensors (any device).
            queries: the attention statistics as query rows: per layer
                ``[q_heads, q_tokens, head_dim]`` ("hnd") or ``[q_tokens,
                q_heads, head_dim]`` ("nhd") in the keys' dtype, post-RoPE as
                the attention saw them; q_heads a multiple of kv_heads (GQA),
                the same q_tokens in every layer.
            query_positions: the rows' token positions: one integer vector
                for every layer, or one per layer; default the last q_tokens
                positions. Rows before the end sit in [0, tokens); probe rows
                (a question or a reconstruction pass run after the context)
                sit at tokens and beyond, up to 2 * tokens + 65536, see
                every key, and may outnumber the tokens (docs/algorithm.md).
            query_outside_lse: optional, per layer ``[q_heads, q_tokens]``
                float: each row's log-sum-exp of its logits (``scale * q.k``,
                the policy's ``scale``, default ``1/sqrt(head_dim)``) over the
                keys it attends outside the cache: a probe pass's own tokens
                up to and including itself (``-inf``: none). The scores then
                count each row's share of all its attention, as KVzip scores
                a reconstruction pass (``medakv.hf.compress`` computes it for
                its probes).
            scores, entropy: precomputed statistics instead of queries: per
                layer float scores ``[kv_heads or q_heads, tokens]``
                (accumulated attention; sent as float32) and one entropy E_l
                per layer.
            modality: which tokens are visual: per-token flags (0 text, 1
                visual; array or list) or spans (``(start, length)`` tuples
                or ``ModalitySpan``); None: all text.
            layout: "hnd" or "nhd", the dims order of every tensor.
            policy: "amber" (this project's), "meda", "full", "streaming_llm",
                "h2o", "snapkv", "pyramidkv" or "look_m"; None (default)
                names no policy: the server runs its ``default`` preset
                (docs/presets.md), or amber when it has none (with options
                given, None is amber).
            rho: fraction of the cache to keep, in (0, 1]; None (default):
                the policy's, the preset's, or 0.2.
            preset: a policy preset of the server (``medakv-server
                --policy_presets``, docs/presets.md) instead of ``policy``
                and its options: pass ``policy=None``; ``rho`` replaces the
                preset's (``rho=None``: the preset's). The summary's
                ``policy`` says what the server ran.
            timeout: deadline in seconds (default: the client's).
            chunk_bytes, response_chunk_bytes: override the client's.
            **options: the policy's options (``medakv.options``): tau,
                alpha_min, alpha_max, exact_total, entropy_heads,
                entropy_source, recent_fraction, text_prior,
                shared_selection, merge, merge_threshold, scale, sinks,
                window, pool_kernel, pyramid_beta. Left out: the policy's
                default.

        Returns:
            ``CompressResult`` with one ``LayerResult`` per layer (``key``,
            ``value``, ``positions``, ``budget``, ``entropy``, ``alpha``) and
            the server's summary. Tensors come back as the keys came in:
            NumPy arrays (bfloat16 as ``ml_dtypes.bfloat16`` or ``uint16``,
            as given) or torch tensors on the keys' device.

        Raises:
            TypeError, ValueError: a bad argument, before anything is sent.
            MedakvError: the call failed (gRPC status and message).
        """
        policy_message = build_policy(policy, rho, options, preset=preset, caller="compress")
        cache = prepare_cache(keys, values, queries, query_positions=query_positions,
                              query_outside_lse=query_outside_lse, scores=scores, entropy=entropy,
                              modality=modality, layout=layout, need_stats=True)
        timeout = self._call_timeout(timeout)
        chunk = self._chunk(chunk_bytes)
        response_chunk = self._response_chunk(response_chunk_bytes)
        header = pb.CompressHeader(shape=cache.shape(), policy=policy_message, stats=cache.stats,
                                   q_tokens=cache.q_tokens, query_positions=cache.has_query_positions,
                                   query_outside_lse=cache.has_query_outside_lse, score_heads=cache.score_heads, max_response_chunk_bytes=response_chunk)
        input_end = sum(_shm.align(len(data)) for _, _, data in cache.pieces)
        output_bytes = _result_bytes_bound(cache)
        region = self._shm.borrow(input_end + output_bytes) if self._shm is not None else None
        if region is not None:
            header.output.CopyFrom(pb.SharedMemoryRef(region=region.name, offset=input_end, length=output_bytes))
        chunks = _request_chunks(cache.pieces, chunk, region)

        def requests() -> Iterator[pb.CompressRequest]:
            yield pb.CompressRequest(header=header)
            for c in chunks:
                yield pb.CompressRequest(chunk=c)

        assembler = _LayerAssembler(self._target, "Compress", range(cache.layers), cache, cache.output,
                                    region=region, area=(input_end, output_bytes))
        clean = False
        try:
            summary = self._compress_call(requests(), timeout, assembler)
            result = CompressResult(layers=assembler.finish(), summary=_summary(summary), dtype=cache.dtype,
                                    layout=cache.layout, kv_heads=cache.kv_heads, head_dim=cache.head_dim,
                                    tokens=cache.tokens, shared_memory=region is not None)
            clean = True
            return result
        finally:
            if region is not None and self._shm is not None:
                self._shm.give_back(region, clean)

    def _compress_call(self, requests: Iterator[pb.CompressRequest], timeout: Optional[float],
                       assembler: "_LayerAssembler") -> pb.CompressSummary:
        summary: Optional[pb.CompressSummary] = None
        call = self._stub.Compress(requests, timeout=timeout, wait_for_ready=self._wait_for_ready,
                                   metadata=self._metadata)
        try:
            for response in call:
                which = response.WhichOneof("msg")
                if which == "layer":
                    assembler.info(response.layer)
                elif which == "chunk":
                    assembler.chunk(response.chunk)
                elif which == "summary":
                    summary = response.summary
        except MedakvError:  # the answer broke the protocol (checked before RpcError: a subclass)
            call.cancel()
            raise
        except grpc.RpcError as e:
            raise self._error(e, "Compress") from None
        except BaseException:  # e.g. KeyboardInterrupt: do not leave the call running
            call.cancel()
            raise
        if summary is None:
            raise MedakvError(grpc.StatusCode.INTERNAL, "server sent no summary at the end of the stream",
                              target=self._target, method="Compress")
        return summary

    # ---- the cache store ------------------------------------------------------------

    def put_cache(self, cache_id: str, keys: Any, values: Any, queries: Any = None, *, query_positions: Any = None,
                  query_outside_lse: Any = None, scores: Any = None, entropy: Any = None, modality: Any = None, layout: str = "hnd",
                  ttl_seconds: int = 0, overwrite: bool = False, tier: str = "auto", timeout: Optional[float] = None,
                  chunk_bytes: Optional[int] = None) -> CacheInfo:
        """Stores a cache on the server under ``cache_id`` (``PutCache``).

        The tensors are given as to ``compress``; the statistics (queries,
        or scores and entropy) are optional and are kept for a later
        ``compress_cache``. ``cache_id``: 1-256 characters of
        ``[A-Za-z0-9._:/-]`` (e.g. a hash of the prompt prefix).
        ``ttl_seconds``: 0 keeps it until evicted or deleted. An existing id
        is ALREADY_EXISTS unless ``overwrite``. ``tier``: where the server
        keeps it: ``"auto"`` (its device tier when it has one and the cache
        fits there, else the host tier), ``"host"``, or ``"device"``
        (FAILED_PRECONDITION on a server without a device tier,
        RESOURCE_EXHAUSTED when the cache cannot fit there). Returns the
        stored entry's ``CacheInfo`` (its ``tier`` says where it went).
        """
        cache_id = _check_cache_id(cache_id)
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, numbers.Integral):
            raise TypeError(f"ttl_seconds: expected an int, got {type(ttl_seconds).__name__}")
        if ttl_seconds < 0:
            raise ValueError(f"ttl_seconds must be >= 0 (0: no expiry), got {ttl_seconds}")
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
        tier_proto = _check_tier(tier)
        cache = prepare_cache(keys, values, queries, query_positions=query_positions,
                              query_outside_lse=query_outside_lse, scores=scores, entropy=entropy,
                              modality=modality, layout=layout, need_stats=False)
        timeout = self._call_timeout(timeout)
        chunk = self._chunk(chunk_bytes)
        header = pb.PutCacheHeader(cache_id=cache_id, shape=cache.shape(), stats=cache.stats,
                                   q_tokens=cache.q_tokens, query_positions=cache.has_query_positions,
                                   query_outside_lse=cache.has_query_outside_lse, score_heads=cache.score_heads, ttl_seconds=int(ttl_seconds), overwrite=overwrite,
                                   tier=tier_proto)

        input_end = sum(_shm.align(len(data)) for _, _, data in cache.pieces)
        region = self._shm.borrow(input_end) if self._shm is not None else None
        chunks = _request_chunks(cache.pieces, chunk, region)

        def requests() -> Iterator[pb.PutCacheRequest]:
            yield pb.PutCacheRequest(header=header)
            for c in chunks:
                yield pb.PutCacheRequest(chunk=c)

        clean = False
        try:
            response = self._stub.PutCache(requests(), timeout=timeout, wait_for_ready=self._wait_for_ready,
                                           metadata=self._metadata)
            clean = True
        except grpc.RpcError as e:
            raise self._error(e, "PutCache") from None
        finally:
            if region is not None and self._shm is not None:
                self._shm.give_back(region, clean)
        return _cache_info(response.info)

    def compress_cache(self, cache_id: str, policy: Optional[str] = None, rho: Optional[float] = None, *,
                       preset: Optional[str] = None, timeout: Optional[float] = None,
                       **options: "Unpack[PolicyOptions]") -> CompressCacheResult:
        """Compresses a stored cache in place with the statistics it was stored with (``CompressCache``).

        ``policy``, ``rho``, ``preset`` and ``options`` as for ``compress``.
        FAILED_PRECONDITION if the cache was stored without statistics or is
        already compressed; NOT_FOUND for an unknown id. Returns the entry's
        new ``CacheInfo``, the per-layer budgets and the summary; fetch the
        compressed tensors with ``get_cache``.
        """
        cache_id = _check_cache_id(cache_id)
        request = pb.CompressCacheRequest(cache_id=cache_id,
                                          policy=build_policy(policy, rho, options, preset=preset,
                                                              caller="compress_cache"))
        timeout = self._call_timeout(timeout)
        try:
            response = self._stub.CompressCache(request, timeout=timeout, wait_for_ready=self._wait_for_ready,
                                                metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e, "CompressCache") from None
        return CompressCacheResult(info=_cache_info(response.info),
                                   layers=[_layer_info(i) for i in response.layers],
                                   summary=_summary(response.summary))

    def get_cache(self, cache_id: str, *, layer_begin: int = 0, layer_end: Optional[int] = None,
                  tensors: str = "numpy", device: Any = None, timeout: Optional[float] = None,
                  response_chunk_bytes: Optional[int] = None) -> StoredCache:
        """Fetches a stored cache, all layers or ``[layer_begin, layer_end)`` (``GetCache``).

        Each layer comes back as a ``LayerResult`` (``key``, ``value``,
        ``positions``, ``budget``; ``entropy`` and ``alpha`` once compressed)
        in the cache's dtype and layout. ``tensors``: "numpy" (bfloat16 as
        ``uint16`` bit patterns; ``.view(ml_dtypes.bfloat16)`` converts) or
        "torch" (on ``device``, default CPU; needs torch installed).
        """
        cache_id = _check_cache_id(cache_id)
        begin = _check_int("layer_begin", layer_begin)
        if begin < 0:
            raise ValueError(f"layer_begin must be >= 0, got {begin}")
        end = None if layer_end is None else _check_int("layer_end", layer_end)
        if end is not None and end <= begin:
            raise ValueError(f"layer_end ({end}) must be > layer_begin ({begin}), or None for every layer")
        output = _output_for(tensors, device)
        timeout = self._call_timeout(timeout)
        request = pb.GetCacheRequest(cache_id=cache_id, layer_begin=begin, layer_end=end or 0,
                                     max_response_chunk_bytes=self._response_chunk(response_chunk_bytes))
        region = None
        if self._shm is not None:
            # The stored size bounds the results: a region that big, and the server writes them there. The
            # call's deadline covers both calls.
            started = time.monotonic()
            stored_bytes = self._stored_bytes(cache_id, timeout)
            region = self._shm.borrow(stored_bytes) if stored_bytes > 0 else None
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - started))
        if region is not None:
            request.output.CopyFrom(pb.SharedMemoryRef(region=region.name, offset=0, length=region.size))
        clean = False
        try:
            stored = self._get_cache_call(request, begin, end, output, timeout, region)
            clean = True
            return stored
        finally:
            if region is not None and self._shm is not None:
                self._shm.give_back(region, clean)

    def _stored_bytes(self, cache_id: str, timeout: Optional[float]) -> int:
        """The stored size of ``cache_id`` (0 when it is not there: GetCache then says NOT_FOUND)."""
        try:
            response = self._stub.ListCaches(pb.ListCachesRequest(prefix=cache_id, limit=1), timeout=timeout,
                                             wait_for_ready=self._wait_for_ready, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e, "ListCaches") from None
        if len(response.caches) == 1 and response.caches[0].cache_id == cache_id:
            return int(response.caches[0].bytes)
        return 0

    def _get_cache_call(self, request: pb.GetCacheRequest, begin: int, end: Optional[int], output: _arrays.Output,
                        timeout: Optional[float], region: Optional[_shm.Region]) -> StoredCache:
        stored: Optional[StoredCache] = None
        assembler: Optional[_LayerAssembler] = None
        call = self._stub.GetCache(request, timeout=timeout, wait_for_ready=self._wait_for_ready,
                                   metadata=self._metadata)
        try:
            for response in call:
                which = response.WhichOneof("msg")
                if which == "info":
                    if stored is not None:
                        raise MedakvError(grpc.StatusCode.INTERNAL, "server sent the cache info twice",
                                          target=self._target, method="GetCache")
                    stored = StoredCache(info=_cache_info(response.info))
                    shape = stored.info.shape
                    if shape.dtype not in _arrays.KV_DTYPES or shape.layout not in ("hnd", "nhd") or min(
                            shape.kv_heads, shape.head_dim, shape.tokens, shape.layers) <= 0:
                        raise MedakvError(grpc.StatusCode.INTERNAL, f"server sent an invalid cache shape: {shape}",
                                          target=self._target, method="GetCache")
                    last = shape.layers if end is None else end
                    if last > shape.layers:
                        raise MedakvError(grpc.StatusCode.INTERNAL, f"server sent layers [{begin}, {last}) of a "
                                          f"{shape.layers}-layer cache", target=self._target, method="GetCache")
                    assembler = _LayerAssembler(self._target, "GetCache", range(begin, last), shape, output,
                                                region=region, area=(0, region.size if region is not None else 0))
                elif assembler is None:
                    raise MedakvError(grpc.StatusCode.INTERNAL, "server sent layers before the cache info",
                                      target=self._target, method="GetCache")
                elif which == "layer":
                    assembler.info(response.layer)
                elif which == "chunk":
                    assembler.chunk(response.chunk)
        except MedakvError:  # the answer broke the protocol (checked before RpcError: a subclass)
            call.cancel()
            raise
        except grpc.RpcError as e:
            raise self._error(e, "GetCache") from None
        except BaseException:  # e.g. KeyboardInterrupt: do not leave the call running
            call.cancel()
            raise
        if stored is None or assembler is None:
            raise MedakvError(grpc.StatusCode.INTERNAL, "server ended the stream without the cache info",
                              target=self._target, method="GetCache")
        stored.layers = assembler.finish()
        stored.shared_memory = region is not None
        return stored

    def delete_cache(self, cache_id: str, *, timeout: Optional[float] = None) -> int:
        """Deletes a stored cache; returns the bytes freed. NOT_FOUND for an unknown id."""
        cache_id = _check_cache_id(cache_id)
        timeout = self._call_timeout(timeout)
        try:
            response = self._stub.DeleteCache(pb.DeleteCacheRequest(cache_id=cache_id), timeout=timeout,
                                              wait_for_ready=self._wait_for_ready, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e, "DeleteCache") from None
        return int(response.bytes_freed)

    def list_caches(self, prefix: str = "", *, limit: int = 0, timeout: Optional[float] = None) -> List[CacheInfo]:
        """The stored caches whose id starts with ``prefix``, sorted by id, at most ``limit`` (0: 1000).

        Follows the server's pages (a page ends early when entries with many modality spans would make it
        large), so ``limit`` caches come back whenever that many are stored.
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
        limit = _check_int("limit", limit)
        if not (0 <= limit < 2**31):
            raise ValueError(f"limit must be in [0, {2**31 - 1}] (0: the server's default), got {limit}")
        timeout = self._call_timeout(timeout)
        want = limit if limit > 0 else 1000
        out: List[CacheInfo] = []
        token = ""
        while True:
            try:
                response = self._stub.ListCaches(
                    pb.ListCachesRequest(prefix=prefix, limit=want - len(out), page_token=token), timeout=timeout,
                    wait_for_ready=self._wait_for_ready, metadata=self._metadata)
            except grpc.RpcError as e:
                raise self._error(e, "ListCaches") from None
            out.extend(_cache_info(c) for c in response.caches)
            token = response.next_page_token
            if not token or len(out) >= want:
                return out

    def stats(self, *, timeout: Optional[float] = None) -> ServerStats:
        """The store's tiers (capacity, use, entries, evictions), compressions in flight, backend, version."""
        timeout = self._call_timeout(timeout)
        try:
            r = self._stub.Stats(pb.StatsRequest(), timeout=timeout, wait_for_ready=self._wait_for_ready,
                                 metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e, "Stats") from None
        return ServerStats(tiers=tuple(TierStats(t.tier, t.capacity_bytes, t.used_bytes, t.entries, t.evictions)
                                       for t in r.tiers),
                           inflight_compressions=r.inflight_compressions, backend=r.backend, version=r.version,
                           shared_memory_regions=r.shared_memory_regions, tenant=r.tenant)

    # ---- helpers -------------------------------------------------------------------

    def _shm_prefix(self) -> str:
        """The name prefix of this client's shared-memory objects: the tenant's (Stats) with a token."""
        if not self._metadata:
            return "medakv-"
        if self._shm_name_prefix is None:
            prefix = self._stub.Stats(pb.StatsRequest(), timeout=_shm._REGISTER_TIMEOUT,
                                      metadata=self._metadata).shm_name_prefix
            self._shm_name_prefix = (prefix or "/medakv-").lstrip("/")
        return self._shm_name_prefix

    def _call_timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self._timeout if timeout is None else _check_timeout(timeout)

    def _chunk(self, chunk_bytes: Optional[int]) -> int:
        return self._chunk_bytes if chunk_bytes is None else _check_chunk_bytes(chunk_bytes)

    def _response_chunk(self, response_chunk_bytes: Optional[int]) -> int:
        if response_chunk_bytes is None:
            return self._response_chunk_bytes
        return _check_response_chunk_bytes(response_chunk_bytes)

    def _error(self, e: grpc.RpcError, method: str) -> MedakvError:
        # The RpcError of a call is also a grpc.Call (code() and details()).
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = (e.details() if callable(getattr(e, "details", None)) else str(e)) or ""
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            details += " (chunk_bytes must stay under the server's --max_message_bytes)"
        return MedakvError(code or grpc.StatusCode.UNKNOWN, details, target=self._target, method=method)


# ---- request chunks ----------------------------------------------------------------------


def _chunks(pieces: Iterable[Tuple[int, "pb.TensorKind", memoryview]],
            chunk_bytes: int) -> Iterator[Tuple[int, "pb.TensorKind", int, bytes]]:
    """(layer, kind, offset, bytes) of every chunk: each tensor in order, in pieces of at most chunk_bytes."""
    for layer, kind, data in pieces:
        for offset in range(0, len(data), chunk_bytes):
            yield layer, kind, offset, bytes(data[offset:offset + chunk_bytes])


def _request_chunks(pieces: Sequence[Tuple[int, "pb.TensorKind", memoryview]], chunk_bytes: int,
                    region: Optional[_shm.Region]) -> Iterator[pb.TensorChunk]:
    """The request's tensor chunks: bytes, or (with a region) each tensor copied into it and sent as one ref.

    The copies are made here, before the call starts, so that the call's
    stream only sends refs."""
    if region is None:
        return (pb.TensorChunk(layer=layer, tensor=kind, offset=offset, data=data)
                for layer, kind, offset, data in _chunks(pieces, chunk_bytes))
    out = []
    at = 0
    view = region.buf
    for layer, kind, data in pieces:
        n = len(data)
        view[at:at + n] = data
        out.append(pb.TensorChunk(layer=layer, tensor=kind, offset=0,
                                  shm=pb.SharedMemoryRef(region=region.name, offset=at, length=n)))
        at += _shm.align(n)
    return iter(out)


def _result_bytes_bound(cache: PreparedCache) -> int:
    """The most bytes a compression's results take: every token kept, key, value and int32 positions per layer."""
    itemsize = 4 if cache.dtype == "float32" else 2
    per_layer = cache.kv_heads * cache.tokens * (2 * cache.head_dim * itemsize + 4)
    return int(cache.layers * per_layer)


# ---- results --------------------------------------------------------------------------------


class _LayerAssembler:
    """Reassembles result layers (a LayerInfo, then key, value and positions chunks in order) and checks them."""

    def __init__(self, target: str, method: str, layers: range, shape: Any, output: _arrays.Output, *,
                 region: Optional[_shm.Region] = None, area: Tuple[int, int] = (0, 0)) -> None:
        self._region = region
        self._area = area  # (offset, length) of the output area in the region
        self._target = target
        self._method = method
        self._expected = layers
        self._kv_heads = int(shape.kv_heads)
        self._head_dim = int(shape.head_dim)
        self._tokens = int(shape.tokens)
        self._dtype = shape.dtype
        self._layout = shape.layout
        self._itemsize = 4 if shape.dtype == "float32" else 2
        self._output = output
        self._info: Dict[int, pb.LayerInfo] = {}
        self._buffers: Dict[Tuple[int, int], np.ndarray] = {}
        self._received: Dict[Tuple[int, int], int] = {}

    def _fail(self, message: str) -> MedakvError:
        return MedakvError(grpc.StatusCode.INTERNAL, f"server sent {message}", target=self._target,
                           method=self._method)

    def info(self, info: pb.LayerInfo) -> None:
        layer = int(info.layer)
        if layer not in self._expected:
            raise self._fail(f"a layer info for layer {layer}, outside the layers asked for "
                             f"[{self._expected.start}, {self._expected.stop})")
        if layer in self._info:
            raise self._fail(f"layer {layer}'s info twice")
        if not (1 <= info.budget <= self._tokens):
            raise self._fail(f"layer {layer}'s budget {info.budget}, outside [1, tokens={self._tokens}]")
        self._info[layer] = info
        row = self._kv_heads * int(info.budget)
        for kind, size in ((pb.TENSOR_KIND_KEY, row * self._head_dim * self._itemsize),
                           (pb.TENSOR_KIND_VALUE, row * self._head_dim * self._itemsize),
                           (pb.TENSOR_KIND_POSITIONS, row * 4)):
            self._buffers[(layer, kind)] = np.empty(size, dtype=np.uint8)
            self._received[(layer, kind)] = 0

    def chunk(self, c: pb.TensorChunk) -> None:
        key = (int(c.layer), int(c.tensor))
        buffer = self._buffers.get(key)
        if buffer is None:
            raise self._fail(f"a chunk of layer {c.layer} tensor {c.tensor} before that layer's info "
                             "(or of a tensor kind that results do not have)")
        if c.WhichOneof("payload") == "shm":
            self._shm_chunk(c, key, buffer)
            return
        if c.WhichOneof("payload") != "data":
            raise self._fail(f"a chunk of layer {c.layer} without bytes")
        done = self._received[key]
        data = c.data
        if c.offset != done or len(data) > buffer.size - done:
            raise self._fail(f"an out-of-order chunk of layer {c.layer}'s {_TENSOR_NAME[key[1]]} (offset {c.offset}, "
                             f"{len(data)} bytes; {done} of {buffer.size} received)")
        buffer[done:done + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._received[key] = done + len(data)

    def _shm_chunk(self, c: pb.TensorChunk, key: Tuple[int, int], buffer: np.ndarray) -> None:
        ref = c.shm
        start, length = self._area
        if self._region is None or ref.region != self._region.name:
            raise self._fail(f"a chunk of layer {c.layer} in shared-memory region {ref.region!r}, which this client "
                             "did not ask for")
        if c.offset != 0 or self._received[key] != 0 or ref.length != buffer.size or ref.offset < start \
                or ref.offset + ref.length > start + length:
            raise self._fail(f"a shared-memory chunk of layer {c.layer}'s {_TENSOR_NAME[key[1]]} outside the output "
                             f"area or of the wrong size (offset {ref.offset}, {ref.length} bytes; area "
                             f"[{start}, {start + length}), tensor {buffer.size} bytes)")
        buffer[:] = np.frombuffer(self._region.buf, dtype=np.uint8, count=ref.length, offset=ref.offset)
        self._received[key] = buffer.size

    def finish(self) -> List[LayerResult]:
        out = []
        for layer in self._expected:
            info = self._info.get(layer)
            if info is None:
                raise self._fail(f"no info for layer {layer}")
            for kind in (pb.TENSOR_KIND_KEY, pb.TENSOR_KIND_VALUE, pb.TENSOR_KIND_POSITIONS):
                size = self._buffers[(layer, kind)].size
                if self._received[(layer, kind)] != size:
                    raise self._fail(f"{self._received[(layer, kind)]} of the {size} bytes of layer {layer}'s "
                                     f"{_TENSOR_NAME[kind]}")
            budget = int(info.budget)
            kv_shape = ((self._kv_heads, budget, self._head_dim) if self._layout == "hnd"
                        else (budget, self._kv_heads, self._head_dim))
            out.append(LayerResult(
                layer=layer,
                key=_arrays.to_output(self._buffers[(layer, pb.TENSOR_KIND_KEY)], self._dtype, kv_shape, self._output),
                value=_arrays.to_output(self._buffers[(layer, pb.TENSOR_KIND_VALUE)], self._dtype, kv_shape,
                                        self._output),
                positions=_arrays.to_output(self._buffers[(layer, pb.TENSOR_KIND_POSITIONS)], "int32",
                                            (self._kv_heads, budget), self._output),
                budget=budget, entropy=float(info.entropy), alpha=float(info.alpha)))
        return out


def _output_for(tensors: str, device: Any) -> _arrays.Output:
    if tensors == "numpy":
        if device is not None:
            raise ValueError("device goes with tensors='torch'")
        return _arrays.Output()
    if tensors == "torch":
        try:
            import torch
        except ImportError:
            raise ValueError("tensors='torch' needs PyTorch installed") from None
        return _arrays.Output(torch_device=torch.device("cpu") if device is None else torch.device(device))
    raise ValueError(f"tensors: expected 'numpy' or 'torch', got {tensors!r}")


def _summary(s: pb.CompressSummary) -> CompressSummary:
    t = s.times
    return CompressSummary(
        tokens_in=int(s.tokens_in), tokens_kept=int(s.tokens_kept), bytes_in=int(s.bytes_in),
        bytes_out=int(s.bytes_out), backend=s.backend, policy=pb.Policy.FromString(s.policy.SerializeToString()),
        times=StageTimes(t.receive_seconds, t.statistics_seconds, t.allocate_seconds, t.select_merge_seconds,
                         t.send_seconds))


def _layer_info(i: pb.LayerInfo) -> LayerInfo:
    return LayerInfo(layer=int(i.layer), budget=int(i.budget), entropy=float(i.entropy), alpha=float(i.alpha))


def _cache_info(c: pb.CacheInfo) -> CacheInfo:
    s = c.shape
    shape = CacheShape(
        layers=s.layers, kv_heads=s.kv_heads, q_heads=s.q_heads, head_dim=s.head_dim, tokens=s.tokens,
        dtype=_DTYPE_NAME.get(s.dtype, "unspecified"), layout=_LAYOUT_NAME.get(s.layout, "unknown"),
        modality=tuple(ModalitySpan(m.start, m.length, "visual" if m.modality == pb.MODALITY_VISUAL else "text")
                       for m in s.modality))
    return CacheInfo(cache_id=c.cache_id, shape=shape, bytes=int(c.bytes), layer_tokens=tuple(c.layer_tokens),
                     compressed=c.compressed, policy=c.policy, created_unix_ms=int(c.created_unix_ms),
                     expires_unix_ms=int(c.expires_unix_ms), tier=c.tier)


# ---- argument checks ----------------------------------------------------------------------------


def _check_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    return int(v)


def _check_timeout(timeout: object) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout: expected seconds as a number (or None), got {type(timeout).__name__}")
    t = float(timeout)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"timeout must be > 0 seconds (None: no deadline), got {timeout}")
    return t


def _check_chunk_bytes(chunk_bytes: object) -> int:
    n = _check_int("chunk_bytes", chunk_bytes)
    if n <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {n}")
    return n


def _check_response_chunk_bytes(response_chunk_bytes: object) -> int:
    n = _check_int("response_chunk_bytes", response_chunk_bytes)
    if n != 0 and not (_MIN_RESPONSE_CHUNK <= n <= _MAX_RESPONSE_CHUNK):
        raise ValueError(f"response_chunk_bytes must be in [{_MIN_RESPONSE_CHUNK}, {_MAX_RESPONSE_CHUNK}] "
                         f"(0: the server's default), got {n}")
    return n


def _check_tier(tier: object) -> "pb.CacheTier":
    if not isinstance(tier, str):
        raise TypeError(f"tier: expected a str ('auto', 'host' or 'device'), got {type(tier).__name__}")
    key = tier.strip().lower()
    if key not in _TIER_PROTO:
        raise ValueError(f"tier: expected 'auto', 'host' or 'device', got {tier!r}")
    return _TIER_PROTO[key]


def _check_cache_id(cache_id: object) -> str:
    if not isinstance(cache_id, str):
        raise TypeError(f"cache_id: expected a str, got {type(cache_id).__name__}")
    if not _CACHE_ID.fullmatch(cache_id):
        raise ValueError(f"cache_id must be 1-256 characters of [A-Za-z0-9._:/-], got {cache_id!r}")
    return cache_id
