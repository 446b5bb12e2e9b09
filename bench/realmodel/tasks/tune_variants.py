"""Option variants of medakv policies on one split, query-agnostic: one capture per instance and probe.

For each instance the uncompressed model answers (harness.decode over a DynamicCache), the context is
captured once with the reconstruction pass of harness.reconstruct_ids and once alone; each variant
(a name -> Client.compress options, "probe": "reconstruct" (default) or "context") is compressed from
those captures on medakv-server and decoded by harness.decode. One JSON line per instance x variant x
keep. This is how the reconstruction defaults of docs/amber.md were chosen on the tune split:

    .venv-kvpress/bin/python tune_variants.py tune 8 results/smollm2_tune_variants.jsonl 127.0.0.1:50177 \
        '{"amber": {"policy": "amber"}, "amber_kvzip": {"policy": "amber", "score_norm": "max",
          "layer_budget": "global", "recent_search_rows": 0, "recent_fraction": 0.0, "sinks": 4}}' 0.1,0.25
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import harness  # noqa: E402
import models  # noqa: E402
import suite  # noqa: E402

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import medakv  # noqa: E402
import medakv.hf  # noqa: E402

split, n_kept, out_path, server = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
VARIANTS = json.loads(sys.argv[5])  # name -> options (policy + kwargs)
KEEPS = [float(k) for k in sys.argv[6].split(",")]
model, tok = models.load("smollm2", os.path.join(os.path.dirname(HERE), "out"), threads=2)
model.set_attn_implementation("sdpa")
client = medakv.Client(server, timeout=600)
head_ids, tail_ids = harness.chat_parts(tok)
done = set()
if os.path.exists(out_path):
    for l in open(out_path):
        r = json.loads(l); done.add((r["id"], r["method"], r["keep"]))
out = open(out_path, "a")
kept = 0
for inst in suite.instances(split, 80, 3600, 5200):
    if kept >= n_kept: break
    ctx, q = harness.split_prompt(tok, inst)
    T = ctx.shape[1]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ctx, past_key_values=cache, logits_to_keep=1, use_cache=True)
    gen, text = harness.decode(model, tok, cache, q, T)
    if not suite.correct(text, inst["answers"]):
        print(inst["id"], "dropped", text, file=sys.stderr); continue
    kept += 1
    probes = {}
    for probe in ("reconstruct", "context"):
        extra = harness.reconstruct_ids(tok, ctx, tail_ids, head_ids.shape[1]) if probe == "reconstruct" else ctx[:, :0]
        with torch.no_grad(), medakv.hf.capture_queries(model, keys=True) as cap:
            model(input_ids=torch.cat([ctx, extra], -1), use_cache=False, logits_to_keep=1)
        end = T + extra.shape[1]
        rows = extra.shape[1] if probe == "reconstruct" else T
        probes[probe] = ([k[0, :, :T] for k in cap.keys], [v[0, :, :T] for v in cap.values],
                         [qq[0, :, end - rows:end] for qq in cap.queries],
                         None if probe == "context" else torch.arange(end - rows, end))
    for name, spec in VARIANTS.items():
        spec = dict(spec); probe = spec.pop("probe", "reconstruct")
        keys, values, queries, pos = probes[probe]
        for keep in KEEPS:
            if (inst["id"], name, keep) in done: continue
            t0 = time.perf_counter()
            res = client.compress(keys, values, queries, query_positions=pos, rho=keep, **spec)
            ts = time.perf_counter() - t0
            c = medakv.hf.CompressedCache.from_result(res, model, context_ids=ctx)
            gen, text = harness.decode(model, tok, c, q, T)
            ok = suite.correct(text, inst["answers"])
            rec = {"id": inst["id"], "task": inst["task"], "method": name, "keep": keep, "correct": ok,
                   "answer": text, "server_s": round(ts, 3), "T": T}
            out.write(json.dumps(rec) + "\n"); out.flush()
            print(inst["id"], name, keep, ok, round(ts, 2), text[:40], file=sys.stderr)
