"""KVzipPress / AdaKVPress: the kept fraction when masked keys are counted (keep 0.25, judge-000, query_agnostic)."""
import sys
import os
REALMODEL = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REALMODEL); sys.path.insert(0, os.path.join(REALMODEL, "tasks"))
import models, suite, torch, harness
import kvpress  # noqa
model, tok = models.load("smollm2", os.path.join(REALMODEL, "out"), threads=1)
model.set_attn_implementation("sdpa")
inst = suite.instances("judge", 1, 3600, 5200)[0]
ctx, q = harness.split_prompt(tok, inst)
for m in ("kvpress:KVzipPress", "kvpress:AdaKVPress(ExpectedAttentionPress)"):
    cache, t, kept = harness.build_cache(model, m, 0.25, ctx, {}, None)
    gen, text = harness.decode(model, tok, cache, q, ctx.shape[1])
    print(m, "kept fraction (masked keys counted):", round(kept, 3), t, text)
