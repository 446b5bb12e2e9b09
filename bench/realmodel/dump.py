#!/usr/bin/env python3
"""dump: run a model over the prompt set and write each prompt's cache for medakv.

For every prompt (prompts.py), one forward pass with the capture attention
(capture.py) gives the post-RoPE keys, values and queries of every prompt row.
Then the model's own greedy continuation is decoded over the full cache, and
its queries (positions T, T+1, ...) are recorded as the held-out "future".

Written under OUT/<model>/ (README.md, "Files"):

  <id>.safetensors         the medakv cache file (README "File format", HND):
                           layer.{l}.key/value [kv_heads, T, D], layer.{l}.query
                           [q_heads, T, D] (every prompt row), layer.{l}.query_positions
                           int32 [T] (0..T-1), modality uint8 [T] (1 = the structured
                           block of a `structured` prompt: a stand-in for image tokens)
  <id>.future.safetensors  tokens int64 [N+1]: the greedy continuation y_0..y_N
                           (y_0 from the prompt's last logits); prompt_ids int64 [T];
                           layer.{l}.query [q_heads, N, D]: the queries of y_0..y_{N-1}
                           at positions T..T+N-1, decoded over the full cache
  <id>.json                prompt text, source file and sha256, shapes, checks, times

Checks, every prompt (recorded in the JSON; a failed check stops the dump):
  - attention probabilities recomputed from the written q and k (model scale, GQA,
    causal or sliding-window mask) against the model's own eager probabilities,
    last --check-rows rows of every layer;
  - the continuation decoded by this tool's prefix attention against transformers'
    own path (sdpa, DynamicCache): prompt logits, teacher-forced logits, tokens;
  - the written files read back equal to the captured tensors.

  nice -n 19 .venv/bin/python dump.py --model smollm2 --out out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models  # noqa: E402
import prompts  # noqa: E402
from models import log  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(models.MODELS))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                   help="output folder (default bench/realmodel/out); files go to OUT/<model>/")
    p.add_argument("--prompts", default="", help="comma list of prompt ids (default: all of prompts.SPECS)")
    p.add_argument("--future", type=int, default=32, help="continuation tokens N (default 32)")
    p.add_argument("--check-rows", type=int, default=64, help="rows per layer of the probability check")
    p.add_argument("--check-tol", type=float, default=1e-4, help="max abs difference the checks accept")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the written key/value/query tensors (default float32)")
    p.add_argument("--query-rows", type=int, default=0,
                   help="write only the last N prompt rows' queries (0: every row)")
    p.add_argument("--force", action="store_true", help="redo prompts whose files exist")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", dest="single_out", default=None,
                   help="with one prompt: write the cache to this path (the future file beside it)")
    return p.parse_args(argv)


def recompute_probs(q, k, rows_pos, scale, window, softcap):
    """softmax(scale q k^T) with the causal (and sliding) mask; q [Hq, R, D], k [Hkv, T, D] -> [Hq, R, T]."""
    import torch
    hq, hkv = q.shape[0], k.shape[0]
    kk = k.repeat_interleave(hq // hkv, dim=0)
    logits = torch.matmul(q, kk.transpose(1, 2)) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    kpos = torch.arange(k.shape[1])
    allowed = kpos.view(1, -1) <= rows_pos.view(-1, 1)
    if window:
        allowed &= (rows_pos.view(-1, 1) - kpos.view(1, -1)) < window
    logits = logits.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    return torch.softmax(logits, dim=-1)


def save_safetensors(tensors: dict, path: str, metadata: dict):
    import numpy as np
    from safetensors.numpy import save_file
    # safetensors writes a numpy array's memory as it lies: a non-C-contiguous array (the
    # captured keys are transposed views) would be written in the wrong order, silently.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def dump_one(model, tok, info: dict, spec, args, out_dir: str, cache_path: str | None = None) -> dict:
    import numpy as np
    import torch

    import capture

    t_start = time.time()
    pr = prompts.build(tok, spec)
    T = len(pr.ids)
    max_pos = info["max_positions"] or 1 << 30
    if T + args.future + 1 > max_pos:
        raise RuntimeError(f"{spec.id}: {T} tokens + continuation exceed the model's {max_pos} positions")
    ids = torch.tensor(pr.ids, dtype=torch.int64)
    L, hq, hkv, D = info["layers"], info["q_heads"], info["kv_heads"], info["head_dim"]
    log(f"{spec.id}: {T} tokens ({sum(pr.modality)} in the structured block), {pr.lines_used} of "
        f"{pr.lines_total} lines of {pr.source_path}")

    # 1. The prompt, captured.
    t0 = time.time()
    logits, rec = capture.prefill_capture(model, ids, check_rows=min(args.check_rows, T))
    t_prefill = time.time() - t0
    if sorted(rec) != list(range(L)):
        raise RuntimeError(f"capture saw layers {sorted(rec)}, expected 0..{L - 1}")
    worst_prob = 0.0
    rows = min(args.check_rows, T)
    rows_pos = torch.arange(T - rows, T)
    for layer in range(L):
        r = rec[layer]
        scale = r["scaling"] if r["scaling"] is not None else info["scale"]
        if abs(scale - info["scale"]) > 1e-9 * info["scale"]:
            raise RuntimeError(f"layer {layer}: attention scale {scale} != expected {info['scale']}")
        want_window = info["sliding_window"] if layer in info["sliding_layers"] else None
        if r["sliding_window"] != want_window:
            raise RuntimeError(f"layer {layer}: sliding window {r['sliding_window']} != config's {want_window}")
        probs = recompute_probs(r["q"][:, -rows:], r["k"], rows_pos, scale, r["sliding_window"], r["softcap"])
        worst_prob = max(worst_prob, float((probs - r["probs"]).abs().max()))

    # 2. The greedy continuation over the full cache (this tool's prefix attention).
    full = {l: (rec[l]["k"], rec[l]["v"], torch.arange(T).expand(hkv, T)) for l in range(L)}
    y0 = int(torch.argmax(logits[-1]))
    t0 = time.time()
    capture.set_prefix([full], room=args.future)
    cont = capture.greedy_prefix(model, y0, T, args.future)[0]
    tokens = [y0] + cont                                     # y_0..y_N
    capture.set_prefix([full], room=args.future)
    tf_logits, future_q = capture.decode_prefix(model, torch.tensor([tokens[:-1]]), T, record_queries=True)
    tf_logits = tf_logits[0]
    t_decode = time.time() - t0
    tf_top1 = tf_logits.argmax(-1).tolist()
    greedy_vs_tf = sum(int(a == b) for a, b in zip(tf_top1, tokens[1:]))

    # 3. transformers' own path: sdpa attention with its DynamicCache.
    t0 = time.time()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        out = model(input_ids=ids.unsqueeze(0), use_cache=True)
        hf_prompt = out.logits[0, -1].float()
        hf = model(input_ids=torch.tensor([tokens[:-1]]), cache=out.past_key_values, use_cache=True)
        hf_logits = hf.logits[0].float()
    t_hf = time.time() - t0
    prompt_diff = float((hf_prompt - logits[-1]).abs().max())
    tf_diff = float((hf_logits - tf_logits).abs().max())
    hf_agree = int((hf_logits.argmax(-1) == tf_logits.argmax(-1)).sum())

    checks = {"probabilities_max_abs_diff": worst_prob, "probability_rows_per_layer": rows,
              "prompt_logits_vs_sdpa_max_abs_diff": prompt_diff,
              "continuation_logits_vs_sdpa_dynamic_cache_max_abs_diff": tf_diff,
              "continuation_top1_vs_sdpa_agree": f"{hf_agree}/{args.future}",
              "greedy_vs_teacher_forced_top1_agree": f"{greedy_vs_tf}/{args.future}"}
    log(f"  checks: probabilities {worst_prob:.2e}, prompt logits vs sdpa {prompt_diff:.2e}, continuation "
        f"logits vs sdpa+DynamicCache {tf_diff:.2e} (top-1 {hf_agree}/{args.future}); prefill {t_prefill:.1f} s, "
        f"decode {t_decode:.1f} s, sdpa check {t_hf:.1f} s")
    # Logits are O(10); float32 reorderings between eager and sdpa give ~1e-5..1e-4.
    logit_tol = 1e-3
    if worst_prob > args.check_tol or prompt_diff > logit_tol or tf_diff > logit_tol:
        raise RuntimeError(f"{spec.id}: check failed: {checks}")

    # 4. Write.
    np_dtype = np.float32 if args.dtype == "float32" else np.float16
    qrows = T if args.query_rows <= 0 else min(args.query_rows, T)
    cache = {"modality": np.asarray(pr.modality, dtype=np.uint8)}
    fut = {"tokens": np.asarray(tokens, dtype=np.int64), "prompt_ids": np.asarray(pr.ids, dtype=np.int64)}
    for l in range(L):
        cache[f"layer.{l}.key"] = rec[l]["k"].numpy().astype(np_dtype)
        cache[f"layer.{l}.value"] = rec[l]["v"].numpy().astype(np_dtype)
        cache[f"layer.{l}.query"] = np.ascontiguousarray(rec[l]["q"][:, T - qrows:].numpy().astype(np_dtype))
        cache[f"layer.{l}.query_positions"] = np.arange(T - qrows, T, dtype=np.int32)
        fut[f"layer.{l}.query"] = future_q[l].numpy().astype(np_dtype)
    meta = {"model": args.model, "prompt_id": spec.id, "kind": spec.kind, "tokens": T,
            "visual_tokens": sum(pr.modality), "layers": L, "q_heads": hq, "kv_heads": hkv, "head_dim": D,
            "scale": repr(info["scale"]), "sliding_window": info["sliding_window"],
            "sliding_layers": json.dumps(info["sliding_layers"]), "dtype": args.dtype,
            "query_rows": qrows, "future": args.future, "source": pr.source_path,
            "source_sha256": pr.source_sha256,
            "notes": "modality 1 marks a block of structured text: a stand-in for image tokens"}
    cache_path = cache_path or os.path.join(out_dir, f"{spec.id}.safetensors")
    future_path = cache_path[:-len(".safetensors")] + ".future.safetensors"
    save_safetensors(cache, cache_path, meta)
    save_safetensors(fut, future_path, dict(meta, future_positions=f"{T}..{T + args.future - 1}"))
    # Read the files back: every tensor equals what was captured (in the written dtype).
    from safetensors.numpy import load_file
    back, back_f = load_file(cache_path), load_file(future_path)
    for l in range(L):
        for name, want in (("key", rec[l]["k"]), ("value", rec[l]["v"]), ("query", rec[l]["q"][:, T - qrows:])):
            if not np.array_equal(back[f"layer.{l}.{name}"], want.numpy().astype(np_dtype)):
                raise RuntimeError(f"{cache_path}: layer.{l}.{name} does not read back as captured")
        if not np.array_equal(back_f[f"layer.{l}.query"], future_q[l].numpy().astype(np_dtype)):
            raise RuntimeError(f"{future_path}: layer.{l}.query does not read back as captured")
    checks["files_read_back"] = "equal"
    record = {"id": spec.id, "kind": spec.kind, "model": args.model, "tokens": T,
              "visual_tokens": sum(pr.modality), "source": pr.source_path, "source_sha256": pr.source_sha256,
              "lines_used": pr.lines_used, "lines_total": pr.lines_total, "target": spec.target,
              "text": pr.text, "continuation": tok.decode(tokens), "continuation_ids": tokens,
              "checks": checks, "shape": {k: info[k] for k in ("layers", "q_heads", "kv_heads", "head_dim")},
              "scale": info["scale"], "sliding_window": info["sliding_window"],
              "sliding_layers": info["sliding_layers"], "dtype": args.dtype, "query_rows": qrows,
              "seconds": {"prefill": t_prefill, "decode": t_decode, "sdpa_check": t_hf,
                          "total": time.time() - t_start},
              "cache_file": os.path.basename(cache_path), "future_file": os.path.basename(future_path)}
    with open(cache_path[:-len(".safetensors")] + ".json", "w") as f:
        json.dump(record, f, indent=1)
    log(f"  wrote {cache_path} ({os.path.getsize(cache_path) / 2**20:.1f} MiB); continuation: "
        f"{tok.decode(tokens)!r}")
    return record


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm

    specs = prompts.by_id([s for s in args.prompts.split(",") if s])
    if args.single_out and len(specs) != 1:
        raise SystemExit("-o needs exactly one --prompts id")
    out_dir = os.path.join(args.out, args.model)
    os.makedirs(out_dir, exist_ok=True)
    model, tok = models.load(args.model, args.out, threads=args.threads)
    info = models.shape_info(model)
    log(f"{args.model}: {info}")
    todo = [s for s in specs if args.force or args.single_out or
            not os.path.exists(os.path.join(out_dir, f"{s.id}.json"))]
    for spec in tqdm(todo, desc=f"dump {args.model}", unit="prompt"):
        dump_one(model, tok, info, spec, args, out_dir, args.single_out)


if __name__ == "__main__":
    main()
