"""medakv policies against NVIDIA kvpress presses on the task suite (suite.py), on the CPU.

Every method builds a cache over a prefix of the prompt and hands it to ONE
greedy decoding function, ``decode``; only the cache differs:

  none                        the prefix prefilled into a transformers DynamicCache (no compression)
  kvpress:no_press            kvpress's pipeline path with press=None (model.model over a DynamicCache)
  kvpress:<Press>             ``with press(model): model.model(input_ids=prefix, past_key_values=cache)``
                              on a DynamicCache, as kvpress's own pipeline does (kvpress called unchanged)
  medakv:full                 medakv.hf.compress(policy="full")
  medakv:<policy>             medakv.hf.compress(model, prefix, policy=..., rho=keep)
  medakv:default+reconstruct  policy=None with the reconstruction probe: the server's default for a
                              reconstruction pass (docs/amber.md, "Reconstruction probes")
  medakv:<policy>+reconstruct probe="reconstruct", probe_ids = "\\n\\nRepeat the previous context exactly."
                              + the chat template's assistant header + the prefix without its chat header
                              (KVzip's prompt, as kvpress's KVzipPress builds it)
  medakv:<policy>+question    probe="question", probe_ids = the question's ids (query_aware setting only:
                              the cache holds the context alone, the question is decoded in full)

Two settings:

  query_agnostic  the prefix is the context (chat header + document); decode feeds the question ids
  query_aware     the prefix is the whole prompt but its last token (the question is compressed with
                  the context); decode feeds the last prompt token

Keep ratios (fraction of the context's KV entries kept; kvpress compression_ratio = 1 - keep):
0.1, 0.25, 0.5. Instances the uncompressed model (``none``) gets wrong in either
setting are dropped (recorded as such, methods not run).

One JSON line per instance x method x keep x setting in results/<model>_<split>.jsonl;
a rerun skips the lines already there. ``kl_first``: KL(uncompressed || method) of the first
answer token's distribution, in nats (the uncompressed model's from the ``none`` run of the same
instance and setting, in this process; absent for lines of a method run in another process than
its ``none``).

    python harness.py --model smollm2 --split judge --kept 24 --candidates 60
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bench/realmodel: models.py
sys.path.insert(0, HERE)

import models  # noqa: E402  (sets OMP_WAIT_POLICY etc. before torch)
import suite  # noqa: E402

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

KEEPS = (0.1, 0.25, 0.5)
SETTINGS = ("query_agnostic", "query_aware")
KVPRESS_PRESSES = ["KVzipPress", "ExpectedAttentionPress", "SnapKVPress", "TOVAPress", "KeyDiffPress",
                   "KnormPress", "StreamingLLMPress", "ObservedAttentionPress", "PyramidKVPress",
                   "AdaKVPress(ExpectedAttentionPress)", "CriticalKVPress(SnapKVPress)", "RandomPress"]
MEDAKV_POLICIES = ["amber", "meda", "h2o", "snapkv", "pyramidkv", "streaming_llm"]
MEDAKV_VARIANTS = ["amber+reconstruct", "snapkv+reconstruct", "amber+question", "snapkv+question",
                   "default+reconstruct"]
SANITY = ["kvpress:no_press", "medakv:full"]
RECONSTRUCT_PROMPT = "\n\nRepeat the previous context exactly."


def log(msg: str) -> None:
    print(f"[{datetime.datetime.utcnow():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ---- the one decoding function ------------------------------------------------------------------

def cache_argument(model) -> str:
    from medakv._hf_cache import _cache_argument
    return _cache_argument(model)


@torch.no_grad()
def decode(model, tok, cache, first_ids: torch.Tensor, context_length: int, max_new_tokens: int = 24):
    """Greedy: feeds first_ids over the cache at positions context_length..., then one token at a time.

    Stops at an EOS token, at a newline once something non-blank was generated, or after
    max_new_tokens. Positions are explicit (the original ones), as kvpress's pipeline does, so a
    physically shorter cache (kvpress) and medakv's CompressedCache (which reports the original
    length) decode the same way. Returns (token ids, text); the log-probabilities of the first
    answer token are left in ``decode.first_logprobs`` (float32, on the CPU) for the KL."""
    kw = cache_argument(model)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    n = first_ids.shape[1]
    pos = torch.arange(context_length, context_length + n).unsqueeze(0)
    out = model(input_ids=first_ids, position_ids=pos, logits_to_keep=1, use_cache=True, **{kw: cache})
    decode.first_logprobs = torch.log_softmax(out.logits[0, -1].float(), -1).cpu()
    nxt = int(out.logits[0, -1].argmax())
    p = context_length + n
    gen: list[int] = []
    for _ in range(max_new_tokens):
        if nxt in eos:
            break
        gen.append(nxt)
        text = tok.decode(gen, skip_special_tokens=True)
        if "\n" in text.lstrip():
            break
        if len(gen) == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]]), position_ids=torch.tensor([[p]]), logits_to_keep=1,
                    use_cache=True, **{kw: cache})
        nxt = int(out.logits[0, -1].argmax())
        p += 1
    return gen, tok.decode(gen, skip_special_tokens=True).strip()


# ---- caches -------------------------------------------------------------------------------------

class TimedClient:
    """A medakv.Client stand-in that times the server call of medakv.hf.compress."""

    def __init__(self, client):
        self.client = client
        self.seconds = 0.0

    def compress(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.client.compress(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def close(self):
        pass


def make_press(name: str, ratio: float):
    import kvpress
    if "(" in name:
        outer, inner = name[:-1].split("(")
        return getattr(kvpress, outer)(getattr(kvpress, inner)(compression_ratio=ratio))
    if name == "RandomPress":
        return kvpress.RandomPress(compression_ratio=ratio, seed=0)
    return getattr(kvpress, name)(compression_ratio=ratio)


def reset_kvpress_state(model) -> None:
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "masked_key_indices"):
            layer.self_attn.masked_key_indices = None


@torch.no_grad()
def build_cache(model, method: str, keep: float, prefix: torch.Tensor, extra: dict, client):
    """(cache, timings dict, kept fraction or None)."""
    t = {}
    reset_kvpress_state(model)
    T = prefix.shape[1]
    if method == "none":
        cache = DynamicCache()
        t0 = time.perf_counter()
        model(input_ids=prefix, past_key_values=cache, logits_to_keep=1, use_cache=True)
        t["prefill"] = time.perf_counter() - t0
        return cache, t, 1.0
    if method.startswith("kvpress:"):
        name = method.split(":", 1)[1]
        cache = DynamicCache()
        press = None if name == "no_press" else make_press(name, round(1.0 - keep, 6))
        eager = name == "ObservedAttentionPress"
        if eager:
            model.set_attn_implementation("eager")
        try:
            t0 = time.perf_counter()
            with press(model) if press is not None else contextlib.nullcontext():
                model.model(input_ids=prefix, past_key_values=cache)
            t["prefill_press"] = time.perf_counter() - t0
        finally:
            if eager:
                model.set_attn_implementation("sdpa")
        # AdaKV, CriticalAdaKV and KVzip (layerwise=False) mask keys (module.masked_key_indices, replaced
        # by fake keys at decode time) instead of removing them: count the masked entries too.
        heads = model.config.num_key_value_heads
        held = sum(cache.get_seq_length(i) for i in range(len(cache.layers))) * heads
        masked = 0
        for layer in model.model.layers:
            mk = getattr(layer.self_attn, "masked_key_indices", None)
            if mk is not None:
                masked += int(mk[0].numel())
        kept = (held - masked) / (len(cache.layers) * heads * T)
        return cache, t, kept
    if method.startswith("medakv:"):
        import medakv.hf
        spec = method.split(":", 1)[1]
        policy, _, probe = spec.partition("+")
        kwargs = {}
        if probe == "question":
            kwargs = {"probe": "question", "probe_ids": extra["question_ids"]}
        elif probe == "reconstruct":
            kwargs = {"probe": "reconstruct", "probe_ids": extra["reconstruct_ids"]}
        timed = TimedClient(client)
        t0 = time.perf_counter()
        if policy == "full":
            cache = medakv.hf.compress(model, prefix, client=timed, policy="full", **kwargs)
        else:  # "default": no policy named, the server's default for the request (its probes)
            cache = medakv.hf.compress(model, prefix, client=timed, policy=None if policy == "default" else policy,
                                       rho=keep, **kwargs)
        total = time.perf_counter() - t0
        t["compress_call"] = total
        t["server"] = timed.seconds
        t["forward"] = total - timed.seconds  # the capture pass (prefill, plus the probe rows) and cache building
        # Entries kept (heads of a layer may keep different numbers: padding rows are not kept entries).
        per_head = cache.kept_per_head
        kept = sum(map(sum, per_head)) / (len(per_head) * len(per_head[0]) * T)
        return cache, t, kept
    raise ValueError(method)


# ---- the run ------------------------------------------------------------------------------------

def method_list(has_probe: bool) -> list[tuple[str, list[float], tuple[str, ...]]]:
    """(method, keeps, settings)."""
    out = [("none", [1.0], SETTINGS)]
    out += [(m, [1.0], SETTINGS) for m in SANITY]
    out += [(f"kvpress:{p}", list(KEEPS), SETTINGS) for p in KVPRESS_PRESSES]
    out += [(f"medakv:{p}", list(KEEPS), SETTINGS) for p in MEDAKV_POLICIES]
    if has_probe:
        for v in MEDAKV_VARIANTS:
            settings = ("query_aware",) if v.endswith("+question") else SETTINGS
            out.append((f"medakv:{v}", list(KEEPS), settings))
    return out


def split_prompt(tok, inst: dict):
    import medakv.hf
    pipe = medakv.hf.Pipeline(None, tok)
    ctx_ids, (q_ids,) = pipe.split(inst["context"], [inst["question"]])
    return ctx_ids, q_ids


def reconstruct_ids(tok, prefix: torch.Tensor, tail_ids: torch.Tensor, head_len: int) -> torch.Tensor:
    """KVzip's reconstruction prompt: instruction + assistant header + the prefix without its chat header."""
    instr = tok(RECONSTRUCT_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    return torch.cat([instr, tail_ids, prefix[:, head_len:]], dim=-1)


def chat_parts(tok):
    """(ids of the chat header before the user's text, ids of the template after it: end of turn + assistant header)."""
    if not getattr(tok, "chat_template", None):
        return torch.zeros(1, 0, dtype=torch.long), tok("\n", add_special_tokens=False, return_tensors="pt").input_ids
    marker = "\x00m\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                   tokenize=False)
    head, tail = text.split(marker)
    return (tok(head, add_special_tokens=False, return_tensors="pt").input_ids,
            tok(tail, add_special_tokens=False, return_tensors="pt").input_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=sorted(models.MODELS))
    ap.add_argument("--split", default="judge", choices=sorted(suite.SOURCES))
    ap.add_argument("--kept", type=int, default=24, help="stop after this many instances pass the baseline")
    ap.add_argument("--candidates", type=int, default=60, help="instances generated (first n of the split)")
    ap.add_argument("--min-chars", type=int, default=3600)
    ap.add_argument("--max-chars", type=int, default=5200)
    ap.add_argument("--methods", default="", help="comma-separated substrings: run only matching methods")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--models-dir", default=os.path.join(os.path.dirname(HERE), "out"))
    ap.add_argument("--server", default=os.environ.get("MEDAKV_SERVER", "127.0.0.1:50177"))
    ap.add_argument("--deadline", default="", help="HH:MM UTC: start no new instance after it")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--keeps", default="", help="comma-separated keep ratios (default: 0.1,0.25,0.5)")
    ap.add_argument("--settings", default="", help="comma-separated settings (default: both)")
    args = ap.parse_args()

    import medakv
    import medakv.hf  # noqa: F401
    import kvpress  # noqa: F401  (registers its attention patch)
    from medakv import _hf_cache
    import inspect
    has_probe = "probe" in inspect.signature(_hf_cache.compress).parameters

    model, tok = models.load(args.model, args.models_dir, threads=args.threads)
    model.set_attn_implementation("sdpa")
    client = medakv.Client(args.server)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.model}_{args.split}{args.tag}.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done[(r["id"], r["setting"], r["method"], r["keep"])] = r
    methods = method_list(has_probe)
    if args.methods:
        pats = args.methods.split(",")
        methods = [m for m in methods if m[0] == "none" or any(p in m[0] for p in pats)]
    if args.keeps:
        ks = [float(x) for x in args.keeps.split(",")]
        methods = [(m, k if k == [1.0] else ks, st) for m, k, st in methods]
    if args.settings:
        wanted = tuple(args.settings.split(","))
        methods = [(m, k, tuple(x for x in st if x in wanted) or st[:0]) for m, k, st in methods]
    log(f"{len(methods)} methods (probe variants: {has_probe}); results: {path} ({len(done)} lines already)")
    head_ids, tail_ids = chat_parts(tok)
    deadline = None
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        now = datetime.datetime.utcnow()
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    kept = 0
    out = open(path, "a")
    for inst in suite.instances(args.split, args.candidates, args.min_chars, args.max_chars):
        if kept >= args.kept:
            break
        if deadline is not None and datetime.datetime.utcnow() >= deadline:
            log("deadline reached: no new instance")
            break
        ctx_ids, q_ids = split_prompt(tok, inst)
        full = torch.cat([ctx_ids, q_ids], dim=-1)
        if not torch.equal(full[:, : head_ids.shape[1]], head_ids):
            raise RuntimeError("the prompt does not start with the chat header")
        prompts = {
            "query_agnostic": (ctx_ids, q_ids, {"question_ids": None}),
            "query_aware": (full[:, :-1], full[:, -1:], {"question_ids": q_ids}),
        }

        first_logprobs = {}  # setting -> the uncompressed model's first-answer-token log-probabilities

        def run(method, keep, setting):
            key = (inst["id"], setting, method, keep)
            if key in done:
                return done[key]
            prefix, first, extra = prompts[setting]
            if method.endswith("+question"):
                prefix, first = ctx_ids, q_ids  # the cache holds the context; the question is decoded
            extra = dict(extra)
            extra["reconstruct_ids"] = reconstruct_ids(tok, prefix, tail_ids, head_ids.shape[1])
            rec = {"model": args.model, "split": args.split, "id": inst["id"], "task": inst["task"],
                   "setting": setting, "method": method, "keep": keep, "ctx_tokens": int(ctx_ids.shape[1]),
                   "prompt_tokens": int(full.shape[1]), "prefix_tokens": int(prefix.shape[1])}
            try:
                cache, t, kept_frac = build_cache(model, method, keep, prefix, extra, client)
                t0 = time.perf_counter()
                gen, text = decode(model, tok, cache, first, prefix.shape[1], args.max_new_tokens)
                t["decode"] = time.perf_counter() - t0
                lp = decode.first_logprobs
                if method == "none":
                    first_logprobs[setting] = lp
                elif setting in first_logprobs:  # both settings end the prompt before the first answer token
                    ref = first_logprobs[setting]
                    rec["kl_first"] = round(float((ref.exp() * (ref - lp)).sum()), 6)
                rec.update({"answer": text, "gen_ids": gen, "correct": suite.correct(text, inst["answers"]),
                            "kept_frac": kept_frac, "time": {k: round(v, 4) for k, v in t.items()}})
                del cache
            except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
                rec.update({"error": f"{type(e).__name__}: {e}"[:500], "correct": None})
                log(f"{inst['id']} {setting} {method} {keep}: ERROR {rec['error'][:200]}")
                traceback.print_exc(limit=3)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            done[key] = rec
            return rec

        t_inst = time.perf_counter()
        base = [run("none", 1.0, s) for s in SETTINGS]
        ok = all(b.get("correct") for b in base)
        log(f"{inst['id']} ({base[0]['ctx_tokens']} ctx tokens): none -> {[b.get('answer') for b in base]} "
            f"want {inst['answers']} {'KEPT' if ok else 'DROPPED'}")
        if not ok:
            continue
        kept += 1
        for method, keeps, settings in methods:
            if method == "none":
                continue
            for setting in settings:
                for keep in keeps:
                    run(method, keep, setting)
        log(f"{inst['id']}: all methods in {time.perf_counter() - t_inst:.0f} s (kept {kept})")
    out.close()
    client.close()
    log(f"done: {kept} instances kept")


if __name__ == "__main__":
    main()
