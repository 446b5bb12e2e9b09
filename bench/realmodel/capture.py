"""The prompt's forward pass, captured, and decoding over a compacted cache.

  prefill_capture  the prompt's forward pass with the model's own eager
                   attention and mask (causal, or sliding-window causal), under
                   medakv.hf.capture_queries: per layer the post-RoPE
                   (post-q_norm/k_norm) queries, keys and values attention
                   receives, the layer's scale, sliding window and softcap,
                   and the eager attention probabilities of the last
                   `check_rows` rows (what the attention module returns), so
                   that the capture can be checked.

  medakv_prefix    an attention function registered in transformers'
                   AttentionInterface for decoding after the prompt without
                   transformers' cache, a batch of different prefixes at once:
                   each layer attends over a prefix given per layer and batch
                   item (keys, values and the *original* token position of each
                   key per kv head: the full prompt, or a compressed cache whose
                   layers have different lengths) plus the new tokens
                   themselves (causal). The new tokens' positions are the
                   caller's (they continue from the original prompt length, not
                   from the compacted one). Sliding-window layers see a key iff
                   q_pos - key_pos < window, with the key's original position.
                   With `append`, the new tokens' keys and values are added to
                   the prefix (greedy generation). medakv.hf.CompressedCache
                   does the same for one sequence inside generate(); this one
                   takes a batch of prefixes, which the evaluation needs.

Everything here is float32 on the CPU.
"""

from __future__ import annotations

import torch

import medakv.hf

PREFIX = "medakv_prefix"


class State:
    """What the prefix attention reads and writes (one model at a time)."""

    def __init__(self):
        self.prefix = {}         # layer -> dict(k [b,Hkv,B,D], v, pos [b,Hkv,B] int64, fill)
        self.qpos = None         # [n] int64 positions of the tokens being decoded
        self.append = False      # add the new keys/values to the prefix
        self.calls = 0


STATE = State()


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
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
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
    set_attention(model, "eager")  # the probabilities of the check are what eager attention returns
    modules = medakv.hf.attention_modules(model)
    probs, hooks = {}, []
    if check_rows:
        def keep(layer):
            def hook(_module, _args, out):
                probs[layer] = out[1][0, :, -check_rows:, :].detach().clone()
            return hook
        hooks = [m.register_forward_hook(keep(layer)) for layer, m in modules.items()]
    try:
        with medakv.hf.capture_queries(model, keys=True) as cap:
            out = model(input_ids=ids.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    records = {}
    for layer, m in modules.items():
        records[layer] = {"q": cap.queries[layer][0].clone(), "k": cap.keys[layer][0].clone(),
                          "v": cap.values[layer][0].clone(), "scaling": getattr(m, "scaling", None),
                          "sliding_window": getattr(m, "sliding_window", None),
                          "softcap": getattr(m, "attn_logit_softcapping", None)}
        if layer in probs:
            records[layer]["probs"] = probs[layer]
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
    with medakv.hf.capture_queries(model) as cap:
        out = model(input_ids=ids, position_ids=STATE.qpos.unsqueeze(0).expand(b, n), use_cache=False)
    queries = {layer: q[0].clone() for layer, q in enumerate(cap.queries)} if record_queries else None
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
