"""Attention functions that capture the model's q/k/v and decode over a compacted cache.

Two functions are registered in transformers' AttentionInterface, each with a
mask function in AttentionMaskInterface (without one the model builds no
causal mask for an unknown implementation, silently):

  medakv_capture  the prompt's forward pass. Records, per layer, the post-RoPE
                  (post-q_norm/k_norm) queries, keys and values that attention
                  receives, then runs the modeling module's own eager attention
                  with the model's own mask (causal, or sliding-window causal).
                  It also keeps the eager attention probabilities of the last
                  `check_rows` rows so that the capture can be checked.

  medakv_prefix   decoding after the prompt without transformers' cache: each
                  layer attends over a prefix given per layer (keys, values and
                  the *original* token position of each key per kv head: the
                  full prompt, or a compressed cache whose layers have different
                  lengths) plus the new tokens themselves (causal). The new
                  tokens' positions are the caller's (they continue from the
                  original prompt length, not from the compacted one). Sliding-
                  window layers see a key iff q_pos - key_pos < window, with the
                  key's original position. With `append`, the new tokens' keys
                  and values are added to the prefix (greedy generation).

Everything here is float32 on the CPU.
"""

from __future__ import annotations

import sys

import torch

CAPTURE = "medakv_capture"
PREFIX = "medakv_prefix"


class State:
    """What the two attention functions read and write (one model at a time)."""

    def __init__(self):
        self.records = {}        # capture: layer -> dict(q, k, v, probs)
        self.check_rows = 0      # capture: keep eager probabilities of the last rows
        self.prefix = {}         # prefix: layer -> dict(k [Hkv,B,D], v, pos [Hkv,B] int64)
        self.qpos = None         # prefix: [n] int64 positions of the tokens being decoded
        self.append = False      # prefix: add the new keys/values to the prefix
        self.future = None       # prefix: when a dict, layer -> query [Hq, n, D] is recorded
        self.calls = 0


STATE = State()


def _eager_of(module):
    mod = sys.modules[type(module).__module__]
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward")
    return fn


def capture_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] post-RoPE; returns eager attention."""
    out, probs = _eager_of(module)(module, query, key, value, attention_mask, *args, **kwargs)
    rec = {"q": query[0].detach().clone(), "k": key[0].detach().clone(), "v": value[0].detach().clone(),
           "scaling": kwargs.get("scaling"), "sliding_window": kwargs.get("sliding_window"),
           "softcap": kwargs.get("softcap")}
    if STATE.check_rows and probs is not None:
        rec["probs"] = probs[0, :, -STATE.check_rows:, :].detach().clone()
    STATE.records[module.layer_idx] = rec
    STATE.calls += 1
    return out, None


FAR = 1 << 62  # the position of an empty slot: no query sees it


def prefix_attention(module, query, key, value, attention_mask, *args, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    """query [b, Hq, n, D], key/value [b, Hkv, n, D] of the new tokens only (no transformers cache).

    Each batch item has its own prefix (a compressed cache); the new tokens go into free slots of
    the layer's buffer, every key is masked by its original position."""
    layer = module.layer_idx
    p = STATE.prefix[layer]
    qpos = STATE.qpos                                   # [n]
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    fill = p["fill"]
    if fill + n > p["k"].shape[2]:
        raise RuntimeError(f"layer {layer}: prefix buffer full ({fill} + {n} > {p['k'].shape[2]})")
    p["k"][:, :, fill:fill + n] = key
    p["v"][:, :, fill:fill + n] = value
    p["pos"][:, :, fill:fill + n] = qpos.view(1, 1, n)
    used = fill + n
    k, v, kpos = p["k"][:, :, :used], p["v"][:, :, :used], p["pos"][:, :, :used]
    if scaling is None:
        scaling = module.head_dim ** -0.5
    q = query.reshape(b, hkv, g, n, d)
    logits = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scaling       # [b, Hkv, g, n, used]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    allowed = kpos.unsqueeze(2) <= qpos.view(1, 1, n, 1)                      # [b, Hkv, n, used]
    if sliding_window is not None:
        allowed = allowed & ((qpos.view(1, 1, n, 1) - kpos.unsqueeze(2)) < sliding_window)
    logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs, v.unsqueeze(2))                                   # [b, Hkv, g, n, D]
    out = out.reshape(b, hq, n, d).transpose(1, 2).contiguous()                 # [b, n, Hq, D]
    if STATE.future is not None:
        STATE.future[layer] = query[0].detach().clone()
    if STATE.append:
        p["fill"] = used
    else:
        p["pos"][:, :, fill:used] = FAR
    STATE.calls += 1
    return out, None


_registered = False


def register():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    AttentionInterface.register(CAPTURE, capture_attention)
    AttentionMaskInterface.register(CAPTURE, eager_mask)       # the model's own additive mask for eager
    AttentionInterface.register(PREFIX, prefix_attention)
    AttentionMaskInterface.register(PREFIX, sdpa_mask)         # built but unused: prefix_attention masks by position
    _registered = True


def set_attention(model, name: str):
    register()
    if model.config._attn_implementation != name:  # switching walks the whole model: only when it changes
        model.set_attn_implementation(name)


@torch.no_grad()
def prefill_capture(model, ids: torch.Tensor, check_rows: int = 0):
    """Forward over the prompt ids [T] with capture; returns (logits [T, V], records by layer)."""
    set_attention(model, CAPTURE)
    STATE.records, STATE.check_rows, STATE.calls = {}, check_rows, 0
    out = model(input_ids=ids.unsqueeze(0), use_cache=False)
    records, STATE.records = STATE.records, {}
    return out.logits[0].float(), records


def set_prefix(prefixes: list, room: int):
    """prefixes: one per batch item, each layer -> (k [Hkv,B,D], v [Hkv,B,D], pos [Hkv,B]) (tensors or
    arrays; B may differ between items and layers). `room`: new tokens the buffers must take."""
    STATE.prefix = {}
    b = len(prefixes)
    for layer in prefixes[0]:
        items = [pr[layer] for pr in prefixes]
        kv = torch.as_tensor(items[0][0])
        hkv, d = kv.shape[0], kv.shape[2]
        bmax = max(int(it[0].shape[1]) for it in items)
        k = torch.zeros(b, hkv, bmax + room, d)
        v = torch.zeros(b, hkv, bmax + room, d)
        pos = torch.full((b, hkv, bmax + room), FAR, dtype=torch.int64)
        for i, (ki, vi, pi) in enumerate(items):
            n = ki.shape[1]
            k[i, :, :n] = torch.as_tensor(ki, dtype=torch.float32)
            v[i, :, :n] = torch.as_tensor(vi, dtype=torch.float32)
            pos[i, :, :n] = torch.as_tensor(pi, dtype=torch.int64)
        STATE.prefix[layer] = {"k": k, "v": v, "pos": pos, "fill": bmax}


@torch.no_grad()
def decode_prefix(model, ids: torch.Tensor, start: int, append: bool = False, record_queries: bool = False):
    """Forward over new tokens ids [b, n] at positions start.. over the prefixes set by set_prefix.

    Returns (logits [b, n, V], queries of batch item 0 by layer [Hq, n, D] or None)."""
    set_attention(model, PREFIX)
    b, n = ids.shape
    STATE.qpos = torch.arange(start, start + n, dtype=torch.int64)
    STATE.append = append
    STATE.future = {} if record_queries else None
    out = model(input_ids=ids, position_ids=STATE.qpos.unsqueeze(0).expand(b, n), use_cache=False)
    queries, STATE.future = STATE.future, None
    return out.logits.float(), queries


@torch.no_grad()
def greedy_prefix(model, first: int, start: int, steps: int) -> list:
    """Greedy decoding over the prefixes (which grow; set_prefix needs room >= steps): feeds `first`
    at position `start`, then each item's argmax; returns [b][steps] tokens. Does not stop at
    end-of-sequence tokens."""
    b = STATE.prefix[0]["k"].shape[0]
    cur = torch.full((b, 1), first, dtype=torch.int64)
    tokens = []
    for i in range(steps):
        logits, _ = decode_prefix(model, cur, start + i, append=True)
        cur = torch.argmax(logits[:, -1], dim=-1, keepdim=True)
        tokens.append(cur[:, 0])
    return torch.stack(tokens, dim=1).tolist()
