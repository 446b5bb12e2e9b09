"""medakv: the Python client of the medakv KV cache compression service.

    import medakv

    with medakv.Client("127.0.0.1:50051") as client:
        result = client.compress(keys=keys, values=values, queries=queries,
                                 modality=[(10, 576)], policy="meda", rho=0.2)
        for layer in result.layers:
            layer.key, layer.value, layer.positions, layer.budget, layer.entropy

``Client`` covers the whole API of medakv-server (proto/medakv/v1/medakv.proto)
except the shared-memory data plane: ``compress``, the cache store
(``put_cache``, ``compress_cache``, ``get_cache``, ``delete_cache``,
``list_caches``, ``stats``) and ``health``. ``medakv.hf`` converts Hugging
Face caches; ``medakv.options`` documents every policy option.
"""

from . import hf, options
from .client import DEFAULT_CHUNK_BYTES, Client
from .errors import MedakvError
from .options import OPTIONS, POLICIES, PolicyOptions, build_policy
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "OPTIONS",
    "POLICIES",
    "CacheInfo",
    "CacheShape",
    "Client",
    "CompressCacheResult",
    "CompressResult",
    "CompressSummary",
    "LayerInfo",
    "LayerResult",
    "MedakvError",
    "ModalitySpan",
    "PolicyOptions",
    "ServerStats",
    "StageTimes",
    "StoredCache",
    "TierStats",
    "build_policy",
    "hf",
    "options",
]
