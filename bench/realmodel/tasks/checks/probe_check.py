"""Per layer-head: are all digit tokens of the pass key kept? medakv amber/snapkv with probe context vs question.

    python checks/probe_check.py judge-000-passkey 0.25   (medakv-server on 127.0.0.1:50177)
"""
import sys
import os
REALMODEL = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REALMODEL); sys.path.insert(0, os.path.join(REALMODEL, "tasks"))
import models, suite, torch, harness, medakv, medakv.hf
model, tok = models.load("smollm2", os.path.join(REALMODEL, "out"), threads=1)
insts = {i["id"]: i for i in suite.instances("judge", 8, 3600, 5200)}
inst = insts[sys.argv[1]]; rho = float(sys.argv[2])
ctx, q = harness.split_prompt(tok, inst)
ids = ctx[0].tolist(); fact = inst["facts"][0]
pos = next(s for s in range(len(ids)) if tok.decode(ids[s:s+40]).strip().startswith(fact[:20]))
n = len(tok(fact, add_special_tokens=False).input_ids)
key_digits = [p for p in range(pos, pos + n) if tok.decode([ids[p]]).strip().isdigit()]
print("fact at", pos, "len", n, "of", ctx.shape[1], "digit tokens", len(key_digits))
c = medakv.Client("127.0.0.1:50177")
for pol, kw in (("amber", {}), ("amber", {"probe": "question", "probe_ids": q}), ("snapkv", {}), ("snapkv", {"probe": "question", "probe_ids": q})):
    cache = medakv.hf.compress(model, ctx, client=c, policy=pol, rho=rho, **kw)
    full_digits = 0; lh = 0
    for l in range(30):
        p = cache.positions(l)
        for h in range(p.shape[0]):
            s = set(p[h].tolist()); lh += 1
            full_digits += all(x in s for x in key_digits)
    gen, text = harness.decode(model, tok, cache, q, ctx.shape[1])
    print(pol, kw.get("probe", "context"), "layer-heads keeping every digit token of the fact: %d/%d" % (full_digits, lh), "|", text)
c.close()
