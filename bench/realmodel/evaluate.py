#!/usr/bin/env python3
"""evaluate: compress every dumped cache with every policy and rho, decode over it, score it.

For each prompt dumped by dump.py (OUT/<model>/<id>.*), each policy and each rho:

  1. `medakv compress <id>.safetensors -o tmp --policy P --rho R --json` (the command-line
     tool on files; every policy with its own defaults).
  2. The compacted cache goes back into the model (capture.py, prefix attention): each
     layer keeps its own length and the original positions of its kept tokens; decoding
     positions continue from the original prompt length T.
  3. Teacher-forced over the full-cache greedy continuation y_0..y_{N-1} (positions
     T..T+N-1): next-token top-1 agreement with the full cache, and mean KL(full || compressed)
     of the next-token distributions over the N positions.
  4. Greedy generation of N tokens from y_0 over the compacted cache (growing as it decodes):
     exact match with the full cache's y_1..y_N, and the length of the matching prefix.
  5. Attention-output error of docs/algorithm.md ("How fidelity is judged") for the future
     queries (the full-cache queries of y_0..y_{N-1}, from the dump): per layer, kv head,
     query head and row, ||softmax(s q K'^T) V' - softmax(s q K^T) V|| / ||softmax(s q K^T) V||
     over all T keys (no mask), the mean over rows x heads x layers. `medakv eval` computes
     this quantity but takes its held-out rows only from the prompt's own query rows, so it
     is computed here, and --crosscheck shows both agree on a cache medakv eval accepts.

The full cache's own reference (logits, continuation) is computed once per prompt; the
compressed variants of a prompt are decoded in batches (--batch). Results are appended
to OUT/<model>/results.jsonl, one line per (prompt, policy, rho); a run that is there is
skipped, so an interrupted evaluation resumes.

  nice -n 19 .venv/bin/python evaluate.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models  # noqa: E402
from models import log  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
POLICIES = ["full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "look_m", "meda", "amber"]
RHOS = [0.05, 0.1, 0.2, 0.5]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(models.MODELS))
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--prompts", default="", help="comma list of prompt ids (default: every dumped prompt)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--rhos", default=",".join(map(str, RHOS)))
    p.add_argument("--medakv", default=os.path.join(REPO, "build", "client", "cli", "medakv"),
                   help="the medakv command-line tool (default build/client/cli/medakv)")
    p.add_argument("--extra", default="", help="extra flags for every `medakv compress` (e.g. '--merge none')")
    p.add_argument("--tag", default="", help="label of this configuration in results.jsonl (with --extra)")
    p.add_argument("--batch", type=int, default=8, help="compressed caches decoded together")
    p.add_argument("--crosscheck", action="store_true",
                   help="also compare this tool's attention-output error with `medakv eval` (see above)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- loading


def load_dump(out_dir: str, pid: str):
    import torch
    from safetensors.torch import load_file
    with open(os.path.join(out_dir, f"{pid}.json")) as f:
        meta = json.load(f)
    cache = load_file(os.path.join(out_dir, meta["cache_file"]))
    fut = load_file(os.path.join(out_dir, meta["future_file"]))
    L = meta["shape"]["layers"]
    T = meta["tokens"]
    hkv = meta["shape"]["kv_heads"]
    full = {l: (cache[f"layer.{l}.key"].float(), cache[f"layer.{l}.value"].float(),
                torch.arange(T).expand(hkv, T)) for l in range(L)}
    future_q = {l: fut[f"layer.{l}.query"].float() for l in range(L)}
    return meta, full, future_q, fut["tokens"].tolist()


def load_compressed(path: str, layers: int):
    import torch
    from safetensors.torch import load_file
    d = load_file(path)
    return {l: (d[f"layer.{l}.key"].float(), d[f"layer.{l}.value"].float(),
                d[f"layer.{l}.positions"].to(torch.int64)) for l in range(layers)}


# ----------------------------------------------------------------------------- metrics


def attention_outputs(q, k, v, scale):
    """q [Hq, N, D], k/v [Hkv, B, D] -> softmax(scale q k^T) v  [Hq, N, D], float64, no mask."""
    import torch
    hq, hkv = q.shape[0], k.shape[0]
    g = hq // hkv
    qd = q.double().reshape(hkv, g * q.shape[1], q.shape[2])
    logits = torch.matmul(qd, k.double().transpose(1, 2)) * scale
    out = torch.matmul(torch.softmax(logits, dim=-1), v.double())
    return out.reshape(hq, q.shape[1], q.shape[2])


def attention_error(future_q, full, comp, scale):
    """Per layer: (sum of relative errors, terms). Terms with ||o|| = 0 are skipped."""
    import torch
    per_layer = []
    for l in sorted(full):
        o = attention_outputs(future_q[l], full[l][0], full[l][1], scale)
        oc = attention_outputs(future_q[l], comp[l][0], comp[l][1], scale)
        norm = torch.linalg.vector_norm(o, dim=-1)
        err = torch.linalg.vector_norm(oc - o, dim=-1)
        ok = norm > 0
        per_layer.append((float((err[ok] / norm[ok]).sum()), int(ok.sum())))
    return per_layer


def kl_rows(logp_ref, logp):
    """KL(ref || other) per row; inputs are log-probabilities [N, V]."""
    import torch
    return (torch.exp(logp_ref) * (logp_ref - logp)).sum(-1)


# ----------------------------------------------------------------------------- running


def run_compress(args, cache_path: str, policy: str, rho: float, out_path: str, scale: float, head_dim: int):
    cmd = [args.medakv, "compress", cache_path, "-o", out_path, "--policy", policy, "--rho", repr(rho), "--json"]
    if abs(scale - head_dim ** -0.5) > 1e-12:
        cmd += ["--scale", repr(scale)]
    cmd += args.extra.split()
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_WAIT_POLICY="passive"))
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    summary = json.loads(r.stdout)
    summary["wall_seconds"] = time.time() - t0
    return summary, cmd


def done_keys(results_path: str) -> set:
    keys = set()
    if os.path.exists(results_path):
        with open(results_path) as f:
            for line in f:
                r = json.loads(line)
                keys.add((r["prompt"], r["policy"], r["rho"], r.get("tag", "")))
    return keys


def evaluate_prompt(model, args, out_dir, pid, runs, results_path, bar):
    import torch

    import capture

    meta, full, future_q, tokens = load_dump(out_dir, pid)
    T, L, N = meta["tokens"], meta["shape"]["layers"], len(tokens) - 1
    scale, head_dim = meta["scale"], meta["shape"]["head_dim"]
    cache_path = os.path.join(out_dir, meta["cache_file"])
    sliding = set(meta["sliding_layers"])

    # The full cache's reference, once.
    t0 = time.time()
    capture.set_prefix([full], room=N)
    ref_logits, _ = capture.decode_prefix(model, torch.tensor([tokens[:-1]]), T)
    logp_ref = torch.log_softmax(ref_logits[0], dim=-1)
    ref_top1 = logp_ref.argmax(-1)
    ref_greedy = tokens[1:]
    agree = int((ref_top1 == torch.tensor(ref_greedy)).sum())
    if agree != N:  # the dump's continuation is the greedy one over the same full cache
        raise RuntimeError(f"{pid}: the full cache's teacher-forced argmax agrees with the dumped "
                           f"continuation at {agree}/{N} positions (a wrong cache file?)")
    t_ref = time.time() - t0

    tmp = tempfile.mkdtemp(prefix=f"medakv_{pid}_", dir=os.path.join(args.out, "tmp"))
    for i in range(0, len(runs), args.batch):
        chunk = runs[i:i + args.batch]
        variants = []
        for policy, rho in chunk:
            path = os.path.join(tmp, f"{policy}_{rho}.safetensors")
            summary, cmd = run_compress(args, cache_path, policy, rho, path, scale, head_dim)
            comp = load_compressed(path, L)
            os.remove(path)
            variants.append((policy, rho, summary, cmd, comp))
            bar.set_postfix_str(f"{pid} {policy} {rho}")
        t0 = time.time()
        capture.set_prefix([v[4] for v in variants], room=N)
        logits, _ = capture.decode_prefix(model, torch.tensor([tokens[:-1]] * len(variants)), T)
        capture.set_prefix([v[4] for v in variants], room=N)
        greedy = capture.greedy_prefix(model, tokens[0], T, N)
        t_decode = (time.time() - t0) / len(variants)
        # One write(2) per line on an O_APPEND descriptor: concurrent evaluations (a --tag
        # variant beside the main run) append to the same file without interleaving.
        fd = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for j, (policy, rho, summary, cmd, comp) in enumerate(variants):
                logp = torch.log_softmax(logits[j], dim=-1)
                kl = kl_rows(logp_ref, logp)
                top1 = logp.argmax(-1)
                g = greedy[j]
                match = next((k for k in range(N) if g[k] != ref_greedy[k]), N)
                per_layer = attention_error(future_q, full, comp, scale)
                terms = sum(c for _, c in per_layer)
                err = sum(s for s, _ in per_layer) / max(terms, 1)
                err_full_layers = [s / c for l, (s, c) in enumerate(per_layer) if l not in sliding and c]
                rec = {"model": args.model, "prompt": pid, "kind": meta["kind"], "tokens": T,
                       "visual_tokens": meta["visual_tokens"], "policy": policy, "rho": rho, "tag": args.tag,
                       "extra": args.extra, "kept_fraction": summary["tokens_kept"] / summary["tokens_in"],
                       "budgets": [int(comp[l][0].shape[1]) for l in range(L)],
                       "top1_agreement": float((top1 == ref_top1).float().mean()),
                       "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                       "greedy_exact": int(match == N), "greedy_prefix": match,
                       "attn_error": err, "attn_error_layers": [s / c if c else None for s, c in per_layer],
                       "attn_error_full_attention_layers": (sum(err_full_layers) / len(err_full_layers)
                                                            if err_full_layers and sliding else None),
                       "compress_seconds": summary["seconds"],
                       "compress_wall_seconds": summary["wall_seconds"], "decode_seconds": t_decode,
                       "reference_seconds": t_ref, "command": " ".join(os.path.relpath(c, REPO)
                                                                         if c.startswith("/") else c
                                                                         for c in cmd)}
                os.write(fd, (json.dumps(rec) + "\n").encode())
                bar.update(1)
        finally:
            os.close(fd)
    os.rmdir(tmp)


def crosscheck(args, out_dir, pid, policies, rhos):
    """medakv eval on a cache it accepts (prompt rows 32..T-1 observed, the future rows held out)
    against this tool's error on `medakv compress` of the same observed rows."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    meta, full, future_q, tokens = load_dump(out_dir, pid)
    T, L, N = meta["tokens"], meta["shape"]["layers"], len(tokens) - 1
    cache = load_file(os.path.join(out_dir, meta["cache_file"]))
    fut = load_file(os.path.join(out_dir, meta["future_file"]))
    tmp = tempfile.mkdtemp(prefix="medakv_xcheck_", dir=os.path.join(args.out, "tmp"))
    obs, ev = dict(cache), dict(cache)
    for l in range(L):
        q = cache[f"layer.{l}.query"]
        # The cross-check keeps q_tokens = T (the recorded table's setting): drop the first N prompt
        # rows; the held-out rows' positions are not used by the error (no mask), so T-1 stands in.
        obs[f"layer.{l}.query"] = np.ascontiguousarray(q[:, N:])
        obs[f"layer.{l}.query_positions"] = np.arange(N, T, dtype=np.int32)
        ev[f"layer.{l}.query"] = np.ascontiguousarray(np.concatenate([q[:, N:], fut[f"layer.{l}.query"]], 1))
        ev[f"layer.{l}.query_positions"] = np.concatenate(
            [np.arange(N, T, dtype=np.int32), np.full(N, T - 1, dtype=np.int32)])
    obs_path, ev_path, csv = (os.path.join(tmp, n) for n in ("obs.safetensors", "ev.safetensors", "eval.csv"))
    save_file(obs, obs_path)
    save_file(ev, ev_path)
    cmd = [args.medakv, "eval", ev_path, "--holdout", str(N), "--policies", ",".join(policies),
           "--rhos", ",".join(map(str, rhos)), "--csv", csv]
    subprocess.run(cmd, check=True, capture_output=True)
    theirs = {}
    with open(csv) as f:
        next(f)
        for line in f:
            p, rho, kept, err = line.strip().split(",")
            theirs[(p, float(rho))] = float(err)
    rows = []
    for (p, rho), e in sorted(theirs.items()):
        out = os.path.join(tmp, "c.safetensors")
        run_compress(args, obs_path, p, rho, out, meta["scale"], meta["shape"]["head_dim"])
        per_layer = attention_error(future_q, full, load_compressed(out, L), meta["scale"])
        os.remove(out)
        mine = sum(s for s, _ in per_layer) / sum(c for _, c in per_layer)
        rows.append({"prompt": pid, "policy": p, "rho": rho, "medakv_eval": e, "evaluate_py": mine,
                     "rel_diff": abs(mine - e) / max(abs(e), 1e-30)})
        log(f"crosscheck {pid} {p} {rho}: medakv eval {e:.6f}, evaluate.py {mine:.6f}")
    for n in os.listdir(tmp):
        os.remove(os.path.join(tmp, n))
    os.rmdir(tmp)
    with open(os.path.join(out_dir, "crosscheck.json"), "w") as f:
        json.dump({"command": " ".join(cmd), "rows": rows}, f, indent=1)
    return rows


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm

    if not os.access(args.medakv, os.X_OK):
        raise SystemExit(f"--medakv: {args.medakv} is not an executable (build the `medakv` target first)")
    out_dir = os.path.join(args.out, args.model)
    os.makedirs(os.path.join(args.out, "tmp"), exist_ok=True)
    policies = [p for p in args.policies.split(",") if p]
    rhos = [float(r) for r in args.rhos.split(",") if r]
    dumped = sorted((json.load(open(os.path.join(out_dir, n))) for n in os.listdir(out_dir)
                     if n.endswith(".json") and n not in ("crosscheck.json",)), key=lambda m: m["tokens"])
    wanted = [p for p in args.prompts.split(",") if p]
    pids = [m["id"] for m in dumped if not wanted or m["id"] in wanted]
    if not pids:
        raise SystemExit(f"no dumped prompts in {out_dir} (run dump.py first)")
    if args.crosscheck:
        crosscheck(args, out_dir, pids[0], [p for p in policies if p != "full"] or policies, rhos)
    results_path = os.path.join(out_dir, "results.jsonl")
    done = done_keys(results_path)
    todo = {}
    for pid in pids:
        runs = []
        for policy in policies:
            for rho in ([1.0] if policy == "full" else rhos):  # full ignores rho: once, as the check row
                if (pid, policy, rho, args.tag) not in done:
                    runs.append((policy, rho))
        if runs:
            todo[pid] = runs
    total = sum(len(r) for r in todo.values())
    log(f"{args.model}: {len(pids)} prompts, {total} runs to do ({len(done)} already in {results_path})")
    if not total:
        return
    model, _ = models.load(args.model, args.out, threads=args.threads)
    with tqdm(total=total, desc=f"evaluate {args.model}", unit="run") as bar:
        for pid, runs in todo.items():
            evaluate_prompt(model, args, out_dir, pid, runs, results_path, bar)


if __name__ == "__main__":
    main()
