"""Policies and their options, checked on the client before anything is sent.

Each policy starts from its own defaults (README "Policies"); an option left
out (or passed as None) keeps the policy's default, exactly as a flag left
out of ``medakv compress``. The checks are the server's (service/server/
convert.cc), so a request that passes them is not refused for its policy.

| option | policies | values (default) |
|---|---|---|
| ``tau`` | meda, amber | [1e-6, 1e6] (1) |
| ``alpha_min``, ``alpha_max`` | meda, amber | [0, 1] (0.01), (0, 1] (1.0); alpha_min <= alpha_max |
| ``exact_total`` | meda | bool (True) |
| ``entropy_heads`` | meda, amber | "mean_attention", "mean_entropy" |
| ``entropy_source`` | meda, amber | "cross_modal", "causal" |
| ``score_norm`` | amber | "sum", "visible_mean", "max" (sum) |
| ``layer_budget`` | amber | "uniform", "mass", "entropy", "depth", "global" (depth; global: per kv head) |
| ``depth_ratio`` | amber | [0.01, 100] (0.8): layer_budget depth's first-layer weight |
| ``recent_search_rows`` | amber | int >= 0 (16): rows whose attention picks each head's recent window; 0: recent_fraction |
| ``recent_fraction`` | meda, h2o, snapkv, pyramidkv, look_m, amber | [0, 1] (0.5) |
| ``text_prior`` | same | "additive", "keep_all_text", "none" (meda: additive, look_m: keep_all_text, others: none) |
| ``shared_selection`` | same | bool (False) |
| ``merge`` | same | "average", "pivotal", "weighted", "none" (meda: average, look_m: pivotal, others: none) |
| ``merge_threshold`` | same | "none", "mean" (none) |
| ``scale`` | same | [0, 1e4]; 0 means 1/sqrt(head_dim) (0) |
| ``sinks`` | streaming_llm, amber | int >= 0 (4; amber 0) |
| ``window`` | snapkv, pyramidkv | int >= 1 (64) |
| ``pool_kernel`` | snapkv, pyramidkv | odd int in [1, 1023] (5) |
| ``pyramid_beta`` | pyramidkv | [1e-3, 1e6] (20) |
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Dict, Mapping, Tuple, TypedDict

from .v1 import medakv_pb2 as pb

__all__ = ["OPTIONS", "POLICIES", "PolicyOptions", "build_policy", "check_preset", "options_of"]

#: Every policy, by the name the CLI and the server use.
POLICIES: Tuple[str, ...] = ("full", "meda", "streaming_llm", "h2o", "snapkv", "pyramidkv", "look_m", "amber")

_SELECT = ("recent_fraction", "text_prior", "shared_selection", "merge", "merge_threshold", "scale")
_OPTIONS_OF: Dict[str, Tuple[str, ...]] = {
    "full": (),
    "meda": ("tau", "alpha_min", "alpha_max", "exact_total", "entropy_heads", "entropy_source") + _SELECT,
    "streaming_llm": ("sinks",),
    "h2o": _SELECT,
    "snapkv": ("window", "pool_kernel") + _SELECT,
    "pyramidkv": ("window", "pool_kernel", "pyramid_beta") + _SELECT,
    "look_m": _SELECT,
    "amber": ("score_norm", "layer_budget", "depth_ratio", "recent_search_rows", "sinks", "tau", "alpha_min",
              "alpha_max", "entropy_heads", "entropy_source") + _SELECT,
}

#: Every option name, in the order of the table above.
OPTIONS: Tuple[str, ...] = (
    "tau", "alpha_min", "alpha_max", "exact_total", "entropy_heads", "entropy_source", "recent_fraction",
    "text_prior", "shared_selection", "merge", "merge_threshold", "scale", "sinks", "window", "pool_kernel",
    "pyramid_beta", "score_norm", "layer_budget", "depth_ratio", "recent_search_rows",
)

_ENUMS: Dict[str, Dict[str, int]] = {
    "entropy_heads": {"mean_attention": pb.ENTROPY_HEADS_MEAN_ATTENTION, "mean_entropy": pb.ENTROPY_HEADS_MEAN_ENTROPY},
    "entropy_source": {"cross_modal": pb.ENTROPY_SOURCE_CROSS_MODAL, "causal": pb.ENTROPY_SOURCE_CAUSAL},
    "text_prior": {"additive": pb.TEXT_PRIOR_ADDITIVE, "keep_all_text": pb.TEXT_PRIOR_KEEP_ALL_TEXT,
                   "none": pb.TEXT_PRIOR_NONE},
    "merge": {"average": pb.MERGE_MODE_AVERAGE, "pivotal": pb.MERGE_MODE_PIVOTAL, "weighted": pb.MERGE_MODE_WEIGHTED,
              "none": pb.MERGE_MODE_NONE},
    "merge_threshold": {"none": pb.MERGE_THRESHOLD_NONE, "mean": pb.MERGE_THRESHOLD_MEAN},
    "score_norm": {"sum": pb.SCORE_NORM_SUM, "visible_mean": pb.SCORE_NORM_VISIBLE_MEAN, "max": pb.SCORE_NORM_MAX},
    "layer_budget": {"uniform": pb.LAYER_BUDGET_UNIFORM, "mass": pb.LAYER_BUDGET_MASS,
                     "entropy": pb.LAYER_BUDGET_ENTROPY, "depth": pb.LAYER_BUDGET_DEPTH,
                     "global": pb.LAYER_BUDGET_GLOBAL},
}

_INT32_MAX = 2**31 - 1
# The server's ranges (kernels/cpu/budget.h, service/compress/options.h).
_TAU_RANGE = (1e-6, 1e6)
_PYRAMID_BETA_RANGE = (1e-3, 1e6)
_MAX_SCALE = 1e4
_MAX_POOL_KERNEL = 1023


class PolicyOptions(TypedDict, total=False):
    """The keyword options of ``Client.compress`` and ``Client.compress_cache`` (see the module doc)."""

    tau: float
    alpha_min: float
    alpha_max: float
    exact_total: bool
    entropy_heads: str
    entropy_source: str
    recent_fraction: float
    text_prior: str
    shared_selection: bool
    merge: str
    merge_threshold: str
    scale: float
    sinks: int
    window: int
    pool_kernel: int
    pyramid_beta: float
    score_norm: str
    layer_budget: str
    depth_ratio: float
    recent_search_rows: int


def options_of(policy: str) -> Tuple[str, ...]:
    """The option names that ``policy`` takes."""
    return _OPTIONS_OF[_policy_name(policy)]


def _key(s: str) -> str:
    return s.strip().lower().replace("-", "_")


def _policy_name(policy: object) -> str:
    if not isinstance(policy, str):
        raise TypeError(f"policy: expected a str (one of: {', '.join(POLICIES)}), got {type(policy).__name__}")
    name = _key(policy)
    if name not in _OPTIONS_OF:
        raise ValueError(f"unknown policy {policy!r} (expected one of: {', '.join(POLICIES)})")
    return name


def _real(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    return float(v)


def _int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    return int(v)


def _bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


def _enum(name: str, v: object) -> int:
    values = _ENUMS[name]
    if not isinstance(v, str):
        raise TypeError(f"{name}: expected a str (one of: {', '.join(values)}), got {type(v).__name__}")
    if _key(v) not in values:
        raise ValueError(f"unknown {name} {v!r} (expected one of: {', '.join(values)})")
    return values[_key(v)]


def check_rho(rho: object) -> float:
    r = _real("rho", rho)
    if not (0.0 < r <= 1.0):
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    return r


_PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def check_preset(preset: object) -> str:
    """A server preset's name (docs/presets.md): 1-64 of [a-z0-9_.-], starting with a letter or digit, not "none"."""
    if not isinstance(preset, str):
        raise TypeError(f"preset: expected a str, got {type(preset).__name__}")
    if not _PRESET_NAME.fullmatch(preset) or preset == "none":
        raise ValueError(f"preset {preset!r}: names are 1-64 characters of [a-z0-9_.-], starting with a lower-case "
                         "letter or a digit, and not 'none'")
    return preset


def build_policy(policy: str | None = None, rho: float | None = None, options: Mapping[str, Any] | None = None,
                 *, preset: str | None = None, caller: str = "build_policy") -> pb.Policy:
    """The ``medakv.v1.Policy`` message for ``policy``, ``rho`` and ``options``.

    Only the options given (and not None) are set; the server fills in the
    policy's defaults for the rest. Raises TypeError for an unknown option
    name or a value of the wrong type, ValueError for an unknown policy, an
    option the policy does not take, or a value out of range (the message
    names the option and the range).

    With ``preset``, the message selects that preset of the server
    (``medakv-server --policy_presets``) instead: ``policy`` must be None and
    no option may be given; ``rho`` (when not None) replaces the preset's.

    ``policy=None`` without a preset or options names no policy: the message
    has no kind, and the server runs its ``default`` preset (with ``rho``
    when given), or amber when it has none; ``rho=None`` is then the
    preset's, or 0.2. With options, ``policy=None`` is amber.
    """
    if preset is not None:
        check_preset(preset)
        if policy is not None:
            raise ValueError(f"preset {preset!r} selects the server's policy: pass policy=None with it "
                             f"(got policy={policy!r})")
        given_options = sorted(k for k, v in (options or {}).items() if v is not None)
        if given_options:
            raise ValueError(f"preset {preset!r} selects the server's policy and its options; "
                             f"{', '.join(given_options)} cannot be given with it (only rho can)")
        return pb.Policy(preset=preset, rho=0.0 if rho is None else check_rho(rho))
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if policy is None and not given:
        return pb.Policy(rho=0.0 if rho is None else check_rho(rho))  # the server's default
    name = _policy_name("amber" if policy is None else policy)
    message = pb.Policy(rho=check_rho(0.2 if rho is None else rho))
    for k in given:
        if k not in OPTIONS:
            raise TypeError(f"{caller}() got an unexpected keyword argument {k!r} "
                            f"(policy options: {', '.join(OPTIONS)})")
        if k not in _OPTIONS_OF[name]:
            takers = [p for p in POLICIES if k in _OPTIONS_OF[p]]
            own = ", ".join(_OPTIONS_OF[name]) or "none"
            raise ValueError(f"option {k!r} does not apply to policy {name!r} (it is an option of "
                             f"{', '.join(takers)}); the options of {name!r} are: {own}")

    # Options shared by the policies that select and merge.
    def fill_select(s: pb.SelectOptions) -> None:
        if "recent_fraction" in given:
            v = _real("recent_fraction", given["recent_fraction"])
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"recent_fraction must be in [0, 1], got {given['recent_fraction']}")
            s.recent_fraction = v
        if "text_prior" in given:
            s.text_prior = _enum("text_prior", given["text_prior"])  # type: ignore[assignment]
        if "shared_selection" in given:
            s.shared_selection = _bool("shared_selection", given["shared_selection"])
        if "merge" in given:
            s.merge = _enum("merge", given["merge"])  # type: ignore[assignment]
        if "merge_threshold" in given:
            s.merge_threshold = _enum("merge_threshold", given["merge_threshold"])  # type: ignore[assignment]
        if "scale" in given:
            v = _real("scale", given["scale"])
            if not 0.0 <= v <= _MAX_SCALE:
                raise ValueError(f"scale must be in [0, {_MAX_SCALE:g}] (0: 1/sqrt(head_dim)), got {given['scale']}")
            s.scale = v

    def window_and_kernel(m: Any) -> None:
        if "window" in given:
            v = _int("window", given["window"])
            if not (1 <= v <= _INT32_MAX):
                raise ValueError(f"window must be in [1, {_INT32_MAX}], got {v}")
            m.window = v
        if "pool_kernel" in given:
            v = _int("pool_kernel", given["pool_kernel"])
            if not (1 <= v <= _MAX_POOL_KERNEL) or v % 2 == 0:
                raise ValueError(f"pool_kernel must be odd and in [1, {_MAX_POOL_KERNEL}], got {v}")
            m.pool_kernel = v

    def in_range(k: str, lo: float, hi: float) -> float:
        v = _real(k, given[k])
        if not lo <= v <= hi:
            raise ValueError(f"{k} must be in [{lo:g}, {hi:g}], got {given[k]}")
        return v

    def sinks(m: Any) -> None:
        if "sinks" in given:
            v = _int("sinks", given["sinks"])
            if not (0 <= v <= _INT32_MAX):
                raise ValueError(f"sinks must be in [0, {_INT32_MAX}], got {v}")
            m.sinks = v

    # The budget and entropy options of meda and amber.
    def budget_and_entropy(m: Any) -> None:
        if "tau" in given:
            m.tau = in_range("tau", *_TAU_RANGE)
        alpha_min, alpha_max = 0.01, 1.0
        if "alpha_min" in given:
            alpha_min = _real("alpha_min", given["alpha_min"])
            if not (0.0 <= alpha_min <= 1.0):
                raise ValueError(f"alpha_min must be in [0, 1], got {given['alpha_min']}")
            m.alpha_min = alpha_min
        if "alpha_max" in given:
            alpha_max = _real("alpha_max", given["alpha_max"])
            if not (0.0 < alpha_max <= 1.0):
                raise ValueError(f"alpha_max must be in (0, 1], got {given['alpha_max']}")
            m.alpha_max = alpha_max
        if alpha_min > alpha_max:
            raise ValueError(
                f"alpha_min ({alpha_min}{'' if 'alpha_min' in given else ', the default'}) must not exceed "
                f"alpha_max ({alpha_max}{'' if 'alpha_max' in given else ', the default'})")
        if "exact_total" in given:
            m.exact_total = _bool("exact_total", given["exact_total"])
        if "entropy_heads" in given:
            m.entropy_heads = _enum("entropy_heads", given["entropy_heads"])
        if "entropy_source" in given:
            m.entropy_source = _enum("entropy_source", given["entropy_source"])

    if name == "full":
        message.full.SetInParent()
    elif name == "meda":
        message.meda.SetInParent()
        budget_and_entropy(message.meda)
        fill_select(message.meda.select)
    elif name == "amber":
        a = message.amber
        a.SetInParent()
        if "score_norm" in given:
            a.score_norm = _enum("score_norm", given["score_norm"])  # type: ignore[assignment]
        if "layer_budget" in given:
            a.layer_budget = _enum("layer_budget", given["layer_budget"])  # type: ignore[assignment]
        if "depth_ratio" in given:
            v = _real("depth_ratio", given["depth_ratio"])
            if not 0.01 <= v <= 100.0:
                raise ValueError(f"depth_ratio must be in [0.01, 100], got {given['depth_ratio']}")
            a.depth_ratio = v
        if "recent_search_rows" in given:
            v = _int("recent_search_rows", given["recent_search_rows"])
            if not 0 <= v <= _INT32_MAX:
                raise ValueError(f"recent_search_rows must be in [0, {_INT32_MAX}], got {v}")
            a.recent_search_rows = v
        sinks(a)
        budget_and_entropy(a)
        fill_select(a.select)
    elif name == "streaming_llm":
        message.streaming_llm.SetInParent()
        sinks(message.streaming_llm)
    elif name == "h2o":
        message.h2o.SetInParent()
        fill_select(message.h2o.select)
    elif name == "snapkv":
        message.snapkv.SetInParent()
        window_and_kernel(message.snapkv)
        fill_select(message.snapkv.select)
    elif name == "pyramidkv":
        message.pyramidkv.SetInParent()
        window_and_kernel(message.pyramidkv)
        if "pyramid_beta" in given:
            message.pyramidkv.beta = in_range("pyramid_beta", *_PYRAMID_BETA_RANGE)
        fill_select(message.pyramidkv.select)
    else:  # look_m
        message.look_m.SetInParent()
        fill_select(message.look_m.select)
    return message
