from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    LAYOUT_HND: _ClassVar[Layout]
    LAYOUT_NHD: _ClassVar[Layout]

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_TEXT: _ClassVar[Modality]
    MODALITY_VISUAL: _ClassVar[Modality]

class StatsForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATS_FORM_UNSPECIFIED: _ClassVar[StatsForm]
    STATS_FORM_QUERIES: _ClassVar[StatsForm]
    STATS_FORM_PRECOMPUTED: _ClassVar[StatsForm]
    STATS_FORM_NONE: _ClassVar[StatsForm]

class EntropyHeads(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTROPY_HEADS_UNSPECIFIED: _ClassVar[EntropyHeads]
    ENTROPY_HEADS_MEAN_ATTENTION: _ClassVar[EntropyHeads]
    ENTROPY_HEADS_MEAN_ENTROPY: _ClassVar[EntropyHeads]

class EntropySource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTROPY_SOURCE_UNSPECIFIED: _ClassVar[EntropySource]
    ENTROPY_SOURCE_CROSS_MODAL: _ClassVar[EntropySource]
    ENTROPY_SOURCE_CAUSAL: _ClassVar[EntropySource]

class TextPrior(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEXT_PRIOR_UNSPECIFIED: _ClassVar[TextPrior]
    TEXT_PRIOR_ADDITIVE: _ClassVar[TextPrior]
    TEXT_PRIOR_KEEP_ALL_TEXT: _ClassVar[TextPrior]
    TEXT_PRIOR_NONE: _ClassVar[TextPrior]

class MergeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_MODE_UNSPECIFIED: _ClassVar[MergeMode]
    MERGE_MODE_AVERAGE: _ClassVar[MergeMode]
    MERGE_MODE_PIVOTAL: _ClassVar[MergeMode]
    MERGE_MODE_WEIGHTED: _ClassVar[MergeMode]
    MERGE_MODE_NONE: _ClassVar[MergeMode]

class MergeThreshold(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_THRESHOLD_UNSPECIFIED: _ClassVar[MergeThreshold]
    MERGE_THRESHOLD_NONE: _ClassVar[MergeThreshold]
    MERGE_THRESHOLD_MEAN: _ClassVar[MergeThreshold]

class ScoreNorm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_NORM_UNSPECIFIED: _ClassVar[ScoreNorm]
    SCORE_NORM_SUM: _ClassVar[ScoreNorm]
    SCORE_NORM_VISIBLE_MEAN: _ClassVar[ScoreNorm]
    SCORE_NORM_MAX: _ClassVar[ScoreNorm]

class LayerBudget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYER_BUDGET_UNSPECIFIED: _ClassVar[LayerBudget]
    LAYER_BUDGET_UNIFORM: _ClassVar[LayerBudget]
    LAYER_BUDGET_MASS: _ClassVar[LayerBudget]
    LAYER_BUDGET_ENTROPY: _ClassVar[LayerBudget]
    LAYER_BUDGET_DEPTH: _ClassVar[LayerBudget]
    LAYER_BUDGET_GLOBAL: _ClassVar[LayerBudget]

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    TENSOR_KIND_KEY: _ClassVar[TensorKind]
    TENSOR_KIND_VALUE: _ClassVar[TensorKind]
    TENSOR_KIND_QUERY: _ClassVar[TensorKind]
    TENSOR_KIND_QUERY_POSITIONS: _ClassVar[TensorKind]
    TENSOR_KIND_SCORES: _ClassVar[TensorKind]
    TENSOR_KIND_ENTROPY: _ClassVar[TensorKind]
    TENSOR_KIND_POSITIONS: _ClassVar[TensorKind]
    TENSOR_KIND_QUERY_OUTSIDE_LSE: _ClassVar[TensorKind]

class CacheTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_TIER_AUTO: _ClassVar[CacheTier]
    CACHE_TIER_HOST: _ClassVar[CacheTier]
    CACHE_TIER_DEVICE: _ClassVar[CacheTier]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
LAYOUT_UNSPECIFIED: Layout
LAYOUT_HND: Layout
LAYOUT_NHD: Layout
MODALITY_TEXT: Modality
MODALITY_VISUAL: Modality
STATS_FORM_UNSPECIFIED: StatsForm
STATS_FORM_QUERIES: StatsForm
STATS_FORM_PRECOMPUTED: StatsForm
STATS_FORM_NONE: StatsForm
ENTROPY_HEADS_UNSPECIFIED: EntropyHeads
ENTROPY_HEADS_MEAN_ATTENTION: EntropyHeads
ENTROPY_HEADS_MEAN_ENTROPY: EntropyHeads
ENTROPY_SOURCE_UNSPECIFIED: EntropySource
ENTROPY_SOURCE_CROSS_MODAL: EntropySource
ENTROPY_SOURCE_CAUSAL: EntropySource
TEXT_PRIOR_UNSPECIFIED: TextPrior
TEXT_PRIOR_ADDITIVE: TextPrior
TEXT_PRIOR_KEEP_ALL_TEXT: TextPrior
TEXT_PRIOR_NONE: TextPrior
MERGE_MODE_UNSPECIFIED: MergeMode
MERGE_MODE_AVERAGE: MergeMode
MERGE_MODE_PIVOTAL: MergeMode
MERGE_MODE_WEIGHTED: MergeMode
MERGE_MODE_NONE: MergeMode
MERGE_THRESHOLD_UNSPECIFIED: MergeThreshold
MERGE_THRESHOLD_NONE: MergeThreshold
MERGE_THRESHOLD_MEAN: MergeThreshold
SCORE_NORM_UNSPECIFIED: ScoreNorm
SCORE_NORM_SUM: ScoreNorm
SCORE_NORM_VISIBLE_MEAN: ScoreNorm
SCORE_NORM_MAX: ScoreNorm
LAYER_BUDGET_UNSPECIFIED: LayerBudget
LAYER_BUDGET_UNIFORM: LayerBudget
LAYER_BUDGET_MASS: LayerBudget
LAYER_BUDGET_ENTROPY: LayerBudget
LAYER_BUDGET_DEPTH: LayerBudget
LAYER_BUDGET_GLOBAL: LayerBudget
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_KEY: TensorKind
TENSOR_KIND_VALUE: TensorKind
TENSOR_KIND_QUERY: TensorKind
TENSOR_KIND_QUERY_POSITIONS: TensorKind
TENSOR_KIND_SCORES: TensorKind
TENSOR_KIND_ENTROPY: TensorKind
TENSOR_KIND_POSITIONS: TensorKind
TENSOR_KIND_QUERY_OUTSIDE_LSE: TensorKind
CACHE_TIER_AUTO: CacheTier
CACHE_TIER_HOST: CacheTier
CACHE_TIER_DEVICE: CacheTier

class ModalitySpan(_message.Message):
    __slots__ = ("start", "length", "modality")
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    start: int
    length: int
    modality: Modality
    def __init__(self, start: _Optional[int] = ..., length: _Optional[int] = ..., modality: _Optional[_Union[Modality, str]] = ...) -> None: ...

class CacheShape(_message.Message):
    __slots__ = ("layers", "kv_heads", "q_heads", "head_dim", "tokens", "dtype", "layout", "modality")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    Q_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    tokens: int
    dtype: DType
    layout: Layout
    modality: _containers.RepeatedCompositeFieldContainer[ModalitySpan]
    def __init__(self, layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., q_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., tokens: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., layout: _Optional[_Union[Layout, str]] = ..., modality: _Optional[_Iterable[_Union[ModalitySpan, _Mapping]]] = ...) -> None: ...

class SelectOptions(_message.Message):
    __slots__ = ("recent_fraction", "text_prior", "shared_selection", "merge", "merge_threshold", "scale")
    RECENT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_PRIOR_FIELD_NUMBER: _ClassVar[int]
    SHARED_SELECTION_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    MERGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    recent_fraction: float
    text_prior: TextPrior
    shared_selection: bool
    merge: MergeMode
    merge_threshold: MergeThreshold
    scale: float
    def __init__(self, recent_fraction: _Optional[float] = ..., text_prior: _Optional[_Union[TextPrior, str]] = ..., shared_selection: bool = ..., merge: _Optional[_Union[MergeMode, str]] = ..., merge_threshold: _Optional[_Union[MergeThreshold, str]] = ..., scale: _Optional[float] = ...) -> None: ...

class FullPolicy(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MedaPolicy(_message.Message):
    __slots__ = ("tau", "alpha_min", "alpha_max", "exact_total", "entropy_heads", "entropy_source", "select")
    TAU_FIELD_NUMBER: _ClassVar[int]
    ALPHA_MIN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_MAX_FIELD_NUMBER: _ClassVar[int]
    EXACT_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_HEADS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    tau: float
    alpha_min: float
    alpha_max: float
    exact_total: bool
    entropy_heads: EntropyHeads
    entropy_source: EntropySource
    select: SelectOptions
    def __init__(self, tau: _Optional[float] = ..., alpha_min: _Optional[float] = ..., alpha_max: _Optional[float] = ..., exact_total: bool = ..., entropy_heads: _Optional[_Union[EntropyHeads, str]] = ..., entropy_source: _Optional[_Union[EntropySource, str]] = ..., select: _Optional[_Union[SelectOptions, _Mapping]] = ...) -> None: ...

class StreamingLlmPolicy(_message.Message):
    __slots__ = ("sinks",)
    SINKS_FIELD_NUMBER: _ClassVar[int]
    sinks: int
    def __init__(self, sinks: _Optional[int] = ...) -> None: ...

class H2OPolicy(_message.Message):
    __slots__ = ("select",)
    SELECT_FIELD_NUMBER: _ClassVar[int]
    select: SelectOptions
    def __init__(self, select: _Optional[_Union[SelectOptions, _Mapping]] = ...) -> None: ...

class SnapKVPolicy(_message.Message):
    __slots__ = ("window", "pool_kernel", "select")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    POOL_KERNEL_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    window: int
    pool_kernel: int
    select: SelectOptions
    def __init__(self, window: _Optional[int] = ..., pool_kernel: _Optional[int] = ..., select: _Optional[_Union[SelectOptions, _Mapping]] = ...) -> None: ...

class PyramidKVPolicy(_message.Message):
    __slots__ = ("window", "pool_kernel", "beta", "select")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    POOL_KERNEL_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    window: int
    pool_kernel: int
    beta: float
    select: SelectOptions
    def __init__(self, window: _Optional[int] = ..., pool_kernel: _Optional[int] = ..., beta: _Optional[float] = ..., select: _Optional[_Union[SelectOptions, _Mapping]] = ...) -> None: ...

class LookMPolicy(_message.Message):
    __slots__ = ("select",)
    SELECT_FIELD_NUMBER: _ClassVar[int]
    select: SelectOptions
    def __init__(self, select: _Optional[_Union[SelectOptions, _Mapping]] = ...) -> None: ...

class AmberPolicy(_message.Message):
    __slots__ = ("score_norm", "layer_budget", "sinks", "tau", "alpha_min", "alpha_max", "entropy_heads", "entropy_source", "select", "recent_search_rows", "depth_ratio")
    SCORE_NORM_FIELD_NUMBER: _ClassVar[int]
    LAYER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SINKS_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    ALPHA_MIN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_MAX_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_HEADS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    RECENT_SEARCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_RATIO_FIELD_NUMBER: _ClassVar[int]
    score_norm: ScoreNorm
    layer_budget: LayerBudget
    sinks: int
    tau: float
    alpha_min: float
    alpha_max: float
    entropy_heads: EntropyHeads
    entropy_source: EntropySource
    select: SelectOptions
    recent_search_rows: int
    depth_ratio: float
    def __init__(self, score_norm: _Optional[_Union[ScoreNorm, str]] = ..., layer_budget: _Optional[_Union[LayerBudget, str]] = ..., sinks: _Optional[int] = ..., tau: _Optional[float] = ..., alpha_min: _Optional[float] = ..., alpha_max: _Optional[float] = ..., entropy_heads: _Optional[_Union[EntropyHeads, str]] = ..., entropy_source: _Optional[_Union[EntropySource, str]] = ..., select: _Optional[_Union[SelectOptions, _Mapping]] = ..., recent_search_rows: _Optional[int] = ..., depth_ratio: _Optional[float] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("rho", "preset", "full", "meda", "streaming_llm", "h2o", "snapkv", "pyramidkv", "look_m", "amber")
    RHO_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    MEDA_FIELD_NUMBER: _ClassVar[int]
    STREAMING_LLM_FIELD_NUMBER: _ClassVar[int]
    H2O_FIELD_NUMBER: _ClassVar[int]
    SNAPKV_FIELD_NUMBER: _ClassVar[int]
    PYRAMIDKV_FIELD_NUMBER: _ClassVar[int]
    LOOK_M_FIELD_NUMBER: _ClassVar[int]
    AMBER_FIELD_NUMBER: _ClassVar[int]
    rho: float
    preset: str
    full: FullPolicy
    meda: MedaPolicy
    streaming_llm: StreamingLlmPolicy
    h2o: H2OPolicy
    snapkv: SnapKVPolicy
    pyramidkv: PyramidKVPolicy
    look_m: LookMPolicy
    amber: AmberPolicy
    def __init__(self, rho: _Optional[float] = ..., preset: _Optional[str] = ..., full: _Optional[_Union[FullPolicy, _Mapping]] = ..., meda: _Optional[_Union[MedaPolicy, _Mapping]] = ..., streaming_llm: _Optional[_Union[StreamingLlmPolicy, _Mapping]] = ..., h2o: _Optional[_Union[H2OPolicy, _Mapping]] = ..., snapkv: _Optional[_Union[SnapKVPolicy, _Mapping]] = ..., pyramidkv: _Optional[_Union[PyramidKVPolicy, _Mapping]] = ..., look_m: _Optional[_Union[LookMPolicy, _Mapping]] = ..., amber: _Optional[_Union[AmberPolicy, _Mapping]] = ...) -> None: ...

class PolicyPreset(_message.Message):
    __slots__ = ("name", "description", "policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    policy: Policy
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class PolicyPresets(_message.Message):
    __slots__ = ("preset",)
    PRESET_FIELD_NUMBER: _ClassVar[int]
    preset: _containers.RepeatedCompositeFieldContainer[PolicyPreset]
    def __init__(self, preset: _Optional[_Iterable[_Union[PolicyPreset, _Mapping]]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region", "offset", "length")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    length: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("layer", "tensor", "offset", "data", "shm")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tensor: TensorKind
    offset: int
    data: bytes
    shm: SharedMemoryRef
    def __init__(self, layer: _Optional[int] = ..., tensor: _Optional[_Union[TensorKind, str]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., shm: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class CompressHeader(_message.Message):
    __slots__ = ("shape", "policy", "stats", "q_tokens", "query_positions", "query_outside_lse", "score_heads", "max_response_chunk_bytes", "output")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    Q_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUERY_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    QUERY_OUTSIDE_LSE_FIELD_NUMBER: _ClassVar[int]
    SCORE_HEADS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    shape: CacheShape
    policy: Policy
    stats: StatsForm
    q_tokens: int
    query_positions: bool
    query_outside_lse: bool
    score_heads: int
    max_response_chunk_bytes: int
    output: SharedMemoryRef
    def __init__(self, shape: _Optional[_Union[CacheShape, _Mapping]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., stats: _Optional[_Union[StatsForm, str]] = ..., q_tokens: _Optional[int] = ..., query_positions: bool = ..., query_outside_lse: bool = ..., score_heads: _Optional[int] = ..., max_response_chunk_bytes: _Optional[int] = ..., output: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class CompressRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: CompressHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[CompressHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("layer", "budget", "entropy", "alpha")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    layer: int
    budget: int
    entropy: float
    alpha: float
    def __init__(self, layer: _Optional[int] = ..., budget: _Optional[int] = ..., entropy: _Optional[float] = ..., alpha: _Optional[float] = ...) -> None: ...

class StageTimes(_message.Message):
    __slots__ = ("receive_seconds", "statistics_seconds", "allocate_seconds", "select_merge_seconds", "send_seconds")
    RECEIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SELECT_MERGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    receive_seconds: float
    statistics_seconds: float
    allocate_seconds: float
    select_merge_seconds: float
    send_seconds: float
    def __init__(self, receive_seconds: _Optional[float] = ..., statistics_seconds: _Optional[float] = ..., allocate_seconds: _Optional[float] = ..., select_merge_seconds: _Optional[float] = ..., send_seconds: _Optional[float] = ...) -> None: ...

class CompressSummary(_message.Message):
    __slots__ = ("tokens_in", "tokens_kept", "bytes_in", "bytes_out", "times", "backend", "policy")
    TOKENS_IN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_KEPT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    tokens_in: int
    tokens_kept: int
    bytes_in: int
    bytes_out: int
    times: StageTimes
    backend: str
    policy: Policy
    def __init__(self, tokens_in: _Optional[int] = ..., tokens_kept: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., times: _Optional[_Union[StageTimes, _Mapping]] = ..., backend: _Optional[str] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class CompressResponse(_message.Message):
    __slots__ = ("layer", "chunk", "summary")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    layer: LayerInfo
    chunk: TensorChunk
    summary: CompressSummary
    def __init__(self, layer: _Optional[_Union[LayerInfo, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., summary: _Optional[_Union[CompressSummary, _Mapping]] = ...) -> None: ...

class PutCacheHeader(_message.Message):
    __slots__ = ("cache_id", "shape", "stats", "q_tokens", "query_positions", "query_outside_lse", "score_heads", "ttl_seconds", "overwrite", "tier")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    Q_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUERY_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    QUERY_OUTSIDE_LSE_FIELD_NUMBER: _ClassVar[int]
    SCORE_HEADS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    shape: CacheShape
    stats: StatsForm
    q_tokens: int
    query_positions: bool
    query_outside_lse: bool
    score_heads: int
    ttl_seconds: int
    overwrite: bool
    tier: CacheTier
    def __init__(self, cache_id: _Optional[str] = ..., shape: _Optional[_Union[CacheShape, _Mapping]] = ..., stats: _Optional[_Union[StatsForm, str]] = ..., q_tokens: _Optional[int] = ..., query_positions: bool = ..., query_outside_lse: bool = ..., score_heads: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., overwrite: bool = ..., tier: _Optional[_Union[CacheTier, str]] = ...) -> None: ...

class PutCacheRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PutCacheHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[PutCacheHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class CacheInfo(_message.Message):
    __slots__ = ("cache_id", "shape", "bytes", "layer_tokens", "compressed", "policy", "created_unix_ms", "expires_unix_ms", "tier")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    shape: CacheShape
    bytes: int
    layer_tokens: _containers.RepeatedScalarFieldContainer[int]
    compressed: bool
    policy: str
    created_unix_ms: int
    expires_unix_ms: int
    tier: str
    def __init__(self, cache_id: _Optional[str] = ..., shape: _Optional[_Union[CacheShape, _Mapping]] = ..., bytes: _Optional[int] = ..., layer_tokens: _Optional[_Iterable[int]] = ..., compressed: bool = ..., policy: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

class PutCacheResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: CacheInfo
    def __init__(self, info: _Optional[_Union[CacheInfo, _Mapping]] = ...) -> None: ...

class CompressCacheRequest(_message.Message):
    __slots__ = ("cache_id", "policy")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    policy: Policy
    def __init__(self, cache_id: _Optional[str] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class CompressCacheResponse(_message.Message):
    __slots__ = ("info", "layers", "summary")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    info: CacheInfo
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    summary: CompressSummary
    def __init__(self, info: _Optional[_Union[CacheInfo, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., summary: _Optional[_Union[CompressSummary, _Mapping]] = ...) -> None: ...

class GetCacheRequest(_message.Message):
    __slots__ = ("cache_id", "layer_begin", "layer_end", "max_response_chunk_bytes", "output")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_BEGIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    layer_begin: int
    layer_end: int
    max_response_chunk_bytes: int
    output: SharedMemoryRef
    def __init__(self, cache_id: _Optional[str] = ..., layer_begin: _Optional[int] = ..., layer_end: _Optional[int] = ..., max_response_chunk_bytes: _Optional[int] = ..., output: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class GetCacheResponse(_message.Message):
    __slots__ = ("info", "layer", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: CacheInfo
    layer: LayerInfo
    chunk: TensorChunk
    def __init__(self, info: _Optional[_Union[CacheInfo, _Mapping]] = ..., layer: _Optional[_Union[LayerInfo, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class DeleteCacheRequest(_message.Message):
    __slots__ = ("cache_id",)
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    def __init__(self, cache_id: _Optional[str] = ...) -> None: ...

class DeleteCacheResponse(_message.Message):
    __slots__ = ("bytes_freed",)
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    bytes_freed: int
    def __init__(self, bytes_freed: _Optional[int] = ...) -> None: ...

class ListCachesRequest(_message.Message):
    __slots__ = ("prefix", "limit", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    limit: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCachesResponse(_message.Message):
    __slots__ = ("caches", "next_page_token")
    CACHES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    caches: _containers.RepeatedCompositeFieldContainer[CacheInfo]
    next_page_token: str
    def __init__(self, caches: _Optional[_Iterable[_Union[CacheInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "entries", "evictions")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    tier: str
    capacity_bytes: int
    used_bytes: int
    entries: int
    evictions: int
    def __init__(self, tier: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "inflight_compressions", "backend", "version", "shared_memory_regions", "tenant", "shm_name_prefix")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_COMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_REGIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    inflight_compressions: int
    backend: str
    version: str
    shared_memory_regions: int
    tenant: str
    shm_name_prefix: str
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., inflight_compressions: _Optional[int] = ..., backend: _Optional[str] = ..., version: _Optional[str] = ..., shared_memory_regions: _Optional[int] = ..., tenant: _Optional[str] = ..., shm_name_prefix: _Optional[str] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region", "shm_name", "size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    shm_name: str
    size: int
    def __init__(self, region: _Optional[str] = ..., shm_name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ("region", "shm_name", "size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    shm_name: str
    size: int
    def __init__(self, region: _Optional[str] = ..., shm_name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
