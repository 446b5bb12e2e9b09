"""Why medakv's reconstruction scores lagged KVzip's: the softmax a repeat row is normalised over.

On the `tune` split (query-agnostic, SmolLM2, the harness's reconstruction prompt), scores every
context token in torch, the way KVzip scores it (each repeat row's attention, the maximum over the
repeat rows and the kv head's query heads), with two normalisers:

  ctx_norm   the softmax over the context's keys alone (what medakv computed before a request could
             carry query_outside_lse)
  own_norm   the softmax over the context's keys and the repeat's own keys up to the row (KVzip's;
             what medakv computes from query_outside_lse, docs/algorithm.md)

then keeps the best slots across every layer and kv head (4 sinks always kept), builds a
CompressedCache from them and decodes the question with harness.decode; kvpress's KVzipPress runs
on the same instances for comparison. One JSON line per instance x method x keep:

    .venv-kvpress/bin/python checks/normaliser_check.py tune 6 results/smollm2_tune_normaliser.jsonl
"""
import json
import os
import sys

TASKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(TASKS))
sys.path.insert(0, TASKS)
import harness  # noqa: E402
import models  # noqa: E402
import suite  # noqa: E402

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import medakv.hf  # noqa: E402
from medakv.types import CompressResult, LayerResult  # noqa: E402

SINKS = 4
KEEPS = (0.1, 0.25)


def scores(cap, T: int, E: int, own: bool, scale: float) -> torch.Tensor:
    """[layers, kv_heads, T]: max over repeat rows and the group's query heads of each row's attention."""
    out = []
    for q_all, k_all in zip(cap.queries, cap.keys):
        q = q_all[0, :, T:T + E].float()                                    # [Hq, E, d]
        k = k_all[0].float()                                                # [Hkv, T + E, d]
        group = q.shape[0] // k.shape[0]
        k = k.repeat_interleave(group, 0)
        ctx = torch.einsum("hed,htd->het", q, k[:, :T]) * scale             # [Hq, E, T]
        norm = ctx
        if own:
            mine = torch.einsum("hed,hfd->hef", q, k[:, T:T + E]) * scale   # [Hq, E, E], causal
            mine = mine.masked_fill(~torch.ones(E, E, dtype=torch.bool).tril(), float("-inf"))
            norm = torch.cat([ctx, mine], -1)
        p = torch.exp(ctx - torch.logsumexp(norm, -1, keepdim=True))
        out.append(p.amax(1).view(k_all.shape[1], group, T).amax(1))
    return torch.stack(out)


def keep_best(S: torch.Tensor, keep: float, cap, T: int) -> CompressResult:
    """The best round(keep x L x Hkv x T) slots across layers and heads (sinks first), padded per layer."""
    L, H, _ = S.shape
    S = S.clone()
    S[:, :, :SINKS] = float("inf")
    chosen = torch.zeros(L * H * T, dtype=torch.bool)
    chosen[torch.topk(S.flatten(), int(round(keep * L * H * T))).indices] = True
    chosen = chosen.view(L, H, T)
    layers = []
    for layer in range(L):
        width = int(chosen[layer].sum(-1).max())
        k, v = cap.keys[layer][0, :, :T], cap.values[layer][0, :, :T]
        K = torch.zeros(H, width, k.shape[-1], dtype=k.dtype)
        V = torch.zeros_like(K)
        P = torch.full((H, width), -1, dtype=torch.int64)
        for h in range(H):
            pos = chosen[layer, h].nonzero().flatten()
            K[h, :len(pos)], V[h, :len(pos)], P[h, :len(pos)] = k[h, pos], v[h, pos], pos
        layers.append(LayerResult(layer=layer, key=K, value=V, positions=P, budget=width, entropy=0.0, alpha=0.0))
    return CompressResult(layers=layers, summary=None, dtype=str(K.dtype).replace("torch.", ""), layout="hnd",
                          kv_heads=H, head_dim=K.shape[-1], tokens=T)


def main() -> None:
    split, n_kept, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model, tok = models.load("smollm2", os.path.join(os.path.dirname(TASKS), "out"), threads=2)
    model.set_attn_implementation("sdpa")
    head_ids, tail_ids = harness.chat_parts(tok)
    out = open(out_path, "a")
    kept = 0
    for inst in suite.instances(split, 80, 3600, 5200):
        if kept >= n_kept:
            break
        ctx, question = harness.split_prompt(tok, inst)
        T = ctx.shape[1]
        full = DynamicCache()
        with torch.no_grad():
            model(input_ids=ctx, past_key_values=full, logits_to_keep=1, use_cache=True)
        if not suite.correct(harness.decode(model, tok, full, question, T)[1], inst["answers"]):
            continue
        kept += 1
        repeat = harness.reconstruct_ids(tok, ctx, tail_ids, head_ids.shape[1])
        with torch.no_grad(), medakv.hf.capture_queries(model, keys=True) as cap:
            model(input_ids=torch.cat([ctx, repeat], -1), use_cache=False, logits_to_keep=1)
        scale = cap.attention_kwargs[0].get("scaling") or cap.queries[0].shape[-1] ** -0.5
        runs = []
        for name, own in (("ctx_norm", False), ("own_norm", True)):
            S = scores(cap, T, repeat.shape[1], own, scale)
            for keep in KEEPS:
                cache = medakv.hf.CompressedCache.from_result(keep_best(S, keep, cap, T), model, context_ids=ctx)
                runs.append((name, keep, cache))
        for keep in KEEPS:
            runs.append(("kvpress:KVzipPress", keep, harness.build_cache(model, "kvpress:KVzipPress", keep, ctx,
                                                                         {}, None)[0]))
        for name, keep, cache in runs:
            text = harness.decode(model, tok, cache, question, T)[1]
            rec = {"id": inst["id"], "task": inst["task"], "method": name, "keep": keep,
                   "correct": suite.correct(text, inst["answers"]), "answer": text, "T": T}
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(inst["id"], name, keep, rec["correct"], text[:50], file=sys.stderr)


if __name__ == "__main__":
    main()
