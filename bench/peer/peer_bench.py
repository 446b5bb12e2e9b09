#!/usr/bin/env python3
"""Peer benchmark (bench/README.md, table 4): NVIDIA's kvpress against medakv on one cache file.

  peer_bench.py run CACHE [--rho 0.2] [--threads 2] [--repeats 5] ...   -> one JSON result
  peer_bench.py table RESULT.json ...                                      -> the markdown table

`run` reads a cache written by `medakv synth` (safetensors: layer.{l}.key and
layer.{l}.value [Hkv, T, D], layer.{l}.query [Hq, Tq, D], layer.{l}.query_positions
[Tq], modality [T]; HND unless the file's metadata says NHD) and times, on the
same tensors, with the same number of threads:

  kvpress  SnapKVPress             against medakv SNAPKV (--policy snapkv)
  kvpress  ObservedAttentionPress  against medakv H2O    (--policy h2o)

medakv runs three ways: in process (`medakv compress FILE --json`, CPU backend)
and through a `medakv-server` this script starts (`medakv compress --server`,
shared memory, and `--no-shm`: bytes on the socket).

How kvpress is driven at tensor level (no model is loaded; kvpress's code is
called unchanged, see README.md):

* Both presses are called through `ScorerPress.compress(module, hidden_states,
  keys, values, attentions, kwargs)`, the method kvpress's forward hook calls
  after a layer's prefill, with keys and values [1, Hkv, T, D] from the file.
* SnapKVPress computes its window queries itself: `get_prerope_query_states`
  runs `module.q_proj(hidden_states[:, -window:])`, then RoPE with
  `kwargs["position_embeddings"]`. The module here is a stub
  (`FileQueryAttention`) whose `q_proj` is the identity; `hidden_states` holds
  the file's query rows, each row the concatenation of its Hq heads
  ([1, Tq + 1, Hq * D], one unused leading row because SnapKVPress asserts
  q_len > window), and `position_embeddings` is (cos = 1, sin = 0), the
  identity rotation, because the file's queries, like its keys, are already
  rotated. So kvpress's window attention sees exactly the file's query rows,
  and still pays for its own projection call, RoPE arithmetic, GQA repeat,
  matmul, mask, softmax and pooling.
* ObservedAttentionPress needs the layer's attention weights (in a model,
  eager attention's output). They are computed here from the file's query rows
  against the keys (causal by the rows' positions, softmax in fp32, GQA by
  grouping the query heads rather than copying the keys) and timed
  separately: medakv's H2O computes its statistics from the same rows inside
  its own timing, so the comparable kvpress figure is attention + press.

Timings: --warmup rounds (not counted), then --repeats rounds, round robin:
each round runs every measurement once (each press over every layer, each
medakv policy and path), in an order rotated every round, so that both sides
see the same share of a shared machine's load; medians. medakv's JSON
summary gives stage times for the whole cache (statistics, allocate,
select_merge; on a server also receive, send and the client's round trip);
its per-layer figure is that total divided by the number of layers. Threads: OMP_NUM_THREADS=N for medakv (its CPU backend
parallelises with OpenMP only) and for this process, and torch.set_num_threads(N);
the CPU time over the wall time of each measured side is reported as a check.

Agreement: medakv's output file holds the kept positions (layer.{l}.positions
[Hkv, B]); kvpress's kept positions come from the same press call with the
values replaced by their own position index (neither press reads the values,
and compress gathers the values with the same indices as the keys); the kept
keys and values of the call as timed are checked against the file's at those
positions.
Both are also compared with a float64 reference of each definition
(docs/algorithm.md's SNAPKV and H2O, and kvpress's observed-attention score).
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------- the file


def load_cache(path, torch):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        names = set(f.keys())
        layers = 0
        while f"layer.{layers}.key" in names:
            layers += 1
        if layers == 0:
            sys.exit(f"{path}: no layer.0.key: not a medakv cache file")
        if "layer.0.query" not in names:
            sys.exit(f"{path}: no layer.0.query: the benchmark needs query rows (not --precomputed)")
        nhd = meta.get("layout", "HND").upper() == "NHD"
        out = []
        for l in range(layers):
            k = f.get_tensor(f"layer.{l}.key")
            v = f.get_tensor(f"layer.{l}.value")
            q = f.get_tensor(f"layer.{l}.query")
            if nhd:  # [T, H, D] -> [H, T, D]
                k, v, q = (x.transpose(0, 1).contiguous() for x in (k, v, q))
            pos = f.get_tensor(f"layer.{l}.query_positions") if f"layer.{l}.query_positions" in names else None
            out.append({"key": k, "value": v, "query": q, "query_positions": pos})
    hkv, t, d = out[0]["key"].shape
    hq, tq, _ = out[0]["query"].shape
    for l, layer in enumerate(out):
        want = torch.arange(t - tq, t, dtype=torch.int32)
        if layer["query_positions"] is not None and not torch.equal(layer["query_positions"].to(torch.int32), want):
            sys.exit(f"{path}: layer {l}'s query rows are not the last {tq} positions; "
                     "kvpress's SnapKV window can only be the last rows of the prompt")
    shape = {"layers": layers, "kv_heads": hkv, "q_heads": hq, "tokens": t, "head_dim": d, "q_tokens": tq,
             "dtype": str(out[0]["key"].dtype).replace("torch.", ""), "layout": "NHD" if nhd else "HND"}
    return out, shape


def uniform_budget(rho, tokens):
    """medakv's UniformBudget: round half up of rho * T, within [1, T]."""
    import math

    return max(1, min(tokens, math.floor(rho * tokens + 0.5)))


def kvpress_ratio(budget, tokens, literal_rho, compute_n_kept):
    """kvpress's compression_ratio that keeps `budget` tokens (compute_n_kept floors T * (1 - ratio))."""
    if literal_rho is not None:
        return 1.0 - literal_rho
    ratio = 1.0 - budget / tokens
    for _ in range(8):  # float rounding: nudge until kvpress keeps exactly `budget`
        n = compute_n_kept(tokens, ratio)
        if n == budget:
            return ratio
        ratio = ratio - 1e-12 if n < budget else ratio + 1e-12
    return ratio


# ---------------------------------------------------------------------------- kvpress


def make_stub(torch, shape):
    from types import SimpleNamespace

    class FileQueryAttention(torch.nn.Module):
        """The attention module kvpress's presses read: its config, head_dim and a
        q_proj. q_proj is the identity, so the 'hidden states' given to the press
        are the file's (already rotated) query rows themselves."""

        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_attention_heads=shape["q_heads"],
                                          num_key_value_heads=shape["kv_heads"])
            self.head_dim = shape["head_dim"]
            self.layer_idx = 0
            self.q_proj = torch.nn.Identity()

    return FileQueryAttention()


def snapkv_inputs(torch, layer, dtype):
    """hidden_states [1, Tq + 1, Hq * D] (row 0 unused) and identity RoPE tables."""
    q = layer["query"].to(dtype)  # [Hq, Tq, D]
    hq, tq, d = q.shape
    hidden = torch.zeros(1, tq + 1, hq * d, dtype=dtype)
    hidden[0, 1:] = q.transpose(0, 1).reshape(tq, hq * d)
    cos = torch.ones(1, tq + 1, d, dtype=dtype)
    sin = torch.zeros(1, tq + 1, d, dtype=dtype)
    return hidden, {"position_embeddings": (cos, sin)}


def causal_mask(torch, tq, t, dtype):
    """Additive mask [Tq, T]: row i (position T - Tq + i) sees keys j <= T - Tq + i."""
    j = torch.arange(t)
    p = torch.arange(t - tq, t).unsqueeze(1)
    return torch.zeros(tq, t, dtype=dtype).masked_fill(j.unsqueeze(0) > p, float("-inf"))


def observed_attention(torch, q, k, mask, scale):
    """Eager attention weights [1, Hq, Tq, T] of the query rows q [Hq, Tq, D]
    against k [1, Hkv, T, D]: query head h reads kv head h // g (GQA by grouping
    the queries, no copy of the keys), softmax in fp32, cast to the keys' dtype
    (as transformers' eager attention does)."""
    hq, tq, d = q.shape
    _, hkv, t, _ = k.shape
    g = hq // hkv
    logits = torch.matmul(q.view(1, hkv, g * tq, d), k.transpose(2, 3)).view(1, hq, tq, t)
    logits = logits * scale + mask
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(k.dtype)


def kept_positions(torch, press, module, hidden, k, v, attentions, kwargs):
    """The positions the press keeps, [Hkv, n] ascending: the same call as the
    timed one with the values replaced by their position index (the presses
    score from queries and keys only and gather keys and values alike)."""
    _, hkv, t, d = k.shape
    idx = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1).expand(1, hkv, t, d).contiguous()
    keys, tagged = press.compress(module, hidden, k, idx, attentions, kwargs)
    pos = tagged[0, :, :, 0].to(torch.int64)
    # The keys it kept are the file's keys at those positions, and the timed
    # call (the real values) keeps the same keys and the values at those positions.
    real_keys, real_values = press.compress(module, hidden, k, v, attentions, kwargs)
    at = pos.unsqueeze(-1).expand(-1, -1, d)
    if not (torch.equal(keys[0], torch.gather(k[0], 1, at)) and torch.equal(real_keys, keys)
            and torch.equal(real_values[0], torch.gather(v[0], 1, at))):
        raise RuntimeError("kvpress's kept keys/values are not the file's at its kept positions")
    return torch.sort(pos, dim=1).values


def kvpress_side(torch, layers, shape, args, budget):
    """The kvpress measurements: {name: one pass over every layer -> sample}, and
    the run's settings. Also returns a function giving each press's kept positions."""
    from kvpress import ObservedAttentionPress, SnapKVPress
    from kvpress.utils import compute_n_kept

    dtype = getattr(torch, args.kvpress_dtype) if args.kvpress_dtype != "native" else layers[0]["key"].dtype
    t, tq, d = shape["tokens"], shape["q_tokens"], shape["head_dim"]
    window = min(args.window, tq)
    ratio = kvpress_ratio(budget, t, args.rho if args.literal_ratio else None, compute_n_kept)
    module = make_stub(torch, shape)
    scale = 1.0 / d ** 0.5
    mask = causal_mask(torch, tq, t, dtype)

    t_cast = time.perf_counter()
    ks = [l["key"].to(dtype).unsqueeze(0).contiguous() for l in layers]
    vs = [l["value"].to(dtype).unsqueeze(0).contiguous() for l in layers]
    qs = [l["query"].to(dtype).contiguous() for l in layers]
    cast_s = time.perf_counter() - t_cast if dtype != layers[0]["key"].dtype else 0.0

    info = {"dtype": str(dtype).replace("torch.", ""), "cast_seconds": cast_s, "compression_ratio": ratio,
            "n_kept": compute_n_kept(t, ratio), "n_kept_literal_rho": compute_n_kept(t, 1.0 - args.rho),
            "window": window, "torch_threads": torch.get_num_threads(),
            "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:8]}

    snap = SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=args.kernel)
    obs = ObservedAttentionPress(compression_ratio=ratio)
    snap_in = [snapkv_inputs(torch, l, dtype) for l in layers]

    def snap_layer(l):
        hidden, kwargs = snap_in[l]
        t0 = time.perf_counter()
        snap.compress(module, hidden, ks[l], vs[l], None, kwargs)
        return {"press": time.perf_counter() - t0}

    def obs_layer(l):
        t0 = time.perf_counter()
        att = observed_attention(torch, qs[l], ks[l], mask, scale)
        t1 = time.perf_counter()
        obs.compress(module, None, ks[l], vs[l], att, {})
        t2 = time.perf_counter()
        return {"attention": t1 - t0, "press": t2 - t1}

    def one_pass(fn):
        def sample():
            with torch.inference_mode():
                c0, w0 = time.process_time(), time.perf_counter()
                per_layer = [fn(l) for l in range(len(layers))]
                return {"per_layer": per_layer, "cpu": time.process_time() - c0, "wall": time.perf_counter() - w0}
        return sample

    measures = {}
    if "snapkv" in args.presses:
        measures[("kvpress", "snapkv")] = one_pass(snap_layer)
    if "observed_attention" in args.presses:
        measures[("kvpress", "observed_attention")] = one_pass(obs_layer)

    def kept(name):
        with torch.inference_mode():
            out = []
            for l in range(len(layers)):
                if name == "snapkv":
                    hidden, kwargs = snap_in[l]
                    out.append(kept_positions(torch, snap, module, hidden, ks[l], vs[l], None, kwargs))
                else:
                    att = observed_attention(torch, qs[l], ks[l], mask, scale)
                    out.append(kept_positions(torch, obs, module, None, ks[l], vs[l], att, {}))
            return out

    return measures, info, kept


def summarize_kvpress(samples, layers):
    parts = list(samples[0]["per_layer"][0].keys())
    totals = [sum(sum(x.values()) for x in s["per_layer"]) for s in samples]
    res = {"seconds_total": median(totals), "seconds_total_all": totals,
           "seconds_per_layer": {p: [median([s["per_layer"][l][p] for s in samples]) for l in range(layers)]
                                 for p in parts},
           "seconds_per_layer_mean": median(totals) / layers,
           "cpu_over_wall": median([s["cpu"] / s["wall"] for s in samples])}
    for p in parts:
        res[f"seconds_{p}"] = median([sum(x[p] for x in s["per_layer"]) for s in samples])
    return res


# ---------------------------------------------------------------------------- medakv


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_medakv(cmd, env, server_pid=None):
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s0 = cpu_ticks(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    j = json.loads(p.stdout)
    j["_wall"] = wall
    j["_client_cpu"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if server_pid:
        j["_server_cpu"] = cpu_ticks(server_pid) - s0
    return j


class Server:
    """medakv-server on a free loopback port (--listen=127.0.0.1:0; the port is read
    from its log), CPU backend, no metrics endpoint, OMP_NUM_THREADS from env."""

    def __init__(self, binary, env, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([binary, "--listen=127.0.0.1:0", "--metrics_listen=", "--backend=cpu"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = None
        deadline = time.time() + 30
        while time.time() < deadline and self.proc.poll() is None:
            with open(log_path) as f:
                m = re.search(r"listening on port (\d+)", f.read())
            if m:
                self.port = int(m.group(1))
                break
            time.sleep(0.1)
        if self.port is None:
            self.stop()
            raise RuntimeError(f"medakv-server did not start (log: {log_path})")
        self.address = f"127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def medakv_side(args, shape, server, out_dir):
    """The medakv measurements: {(policy, path): one `medakv compress` -> its JSON}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    base = os.path.splitext(os.path.basename(args.cache))[0]
    paths = [("in_process", [])]
    if server:
        paths += [("service_shm", ["--server", server.address, "--no-progress"]),
                  ("service_socket", ["--server", server.address, "--no-progress", "--no-shm"])]
    measures, cmds = {}, {}
    for policy in args.policies:
        for path, extra in paths:
            out_file = os.path.join(out_dir, f"{base}.{policy}.{path}.safetensors")
            cmd = [args.medakv, "compress", args.cache, "-o", out_file, "--policy", policy, "--rho", str(args.rho),
                   "--merge", "none", "--json", "--layout", shape["layout"].lower()]
            if policy == "snapkv":
                cmd += ["--window", str(args.window), "--pool-kernel", str(args.kernel)]
            cmd += extra
            pid = server.proc.pid if server and path != "in_process" else None
            measures[(policy, path)] = (lambda cmd=cmd, pid=pid: run_medakv(cmd, env, pid))
            cmds[(policy, path)] = (cmd, out_file)
    return measures, cmds


def summarize_medakv(runs, cmd, out_file, layers, path):
    def med(key):
        return median([r["seconds"][key] for r in runs if key in r["seconds"]])

    compute = [r["seconds"]["statistics"] + r["seconds"]["allocate"] + r["seconds"]["select_merge"] for r in runs]
    res = {
        "cmd": " ".join(cmd), "output": out_file,
        "seconds_compute": median(compute), "seconds_compute_all": compute,
        "seconds_per_layer_mean": median(compute) / layers,
        "seconds_statistics": med("statistics"), "seconds_allocate": med("allocate"),
        "seconds_select_merge": med("select_merge"), "seconds_write": med("write"),
        "seconds_total": med("total"), "seconds_wall": median([r["_wall"] for r in runs]),
        "budget": runs[-1]["per_layer"][0]["budget"], "tokens_kept": runs[-1]["tokens_kept"],
    }
    if path == "in_process":
        # The CLI's CPU time over its compute stages: the process also maps the
        # file and writes the result, so this understates the threads the stages use.
        res["cpu_over_wall"] = median([r["_client_cpu"] / r["_wall"] for r in runs])
        res["cpu_over_compute"] = median([r["_client_cpu"] / c for r, c in zip(runs, compute)])
    else:
        res["seconds_receive"] = med("receive")
        res["seconds_send"] = med("send")
        res["seconds_round_trip"] = med("round_trip")
        res["shared_memory"] = [r.get("shared_memory") for r in runs]
        res["server_cpu_over_compute"] = median([r["_server_cpu"] / c for r, c in zip(runs, compute)])
    return res


def read_positions(path, layers, torch):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return [f.get_tensor(f"layer.{l}.positions").to(torch.int64) for l in range(layers)]


# ---------------------------------------------------------------------------- float64 references


def reference_kept(torch, layer, budget, window, kernel, rho_recent=0.5):
    """docs/algorithm.md's SNAPKV and H2O, and kvpress's observed-attention score, in
    float64 from the file's tensors. Returns {name: kept [Hkv, B]} and the scores."""
    k = layer["key"].to(torch.float64)  # [Hkv, T, D]
    q = layer["query"].to(torch.float64)  # [Hq, Tq, D]
    hkv, t, d = k.shape
    hq, tq, _ = q.shape
    g = hq // hkv
    logits = torch.matmul(q.view(hkv, g * tq, d), k.transpose(1, 2)).view(hq, tq, t) / d ** 0.5
    j = torch.arange(t)
    p = torch.arange(t - tq, t).unsqueeze(1)
    a = torch.softmax(logits.masked_fill(j > p, float("-inf")), dim=-1)  # [Hq, Tq, T]
    del logits

    def top(scores, n, lo, hi):
        """Top n of [lo, hi) per head; ties: higher score, then the later position."""
        if n <= 0:
            return torch.empty(scores.shape[0], 0, dtype=torch.int64)
        s = scores[:, lo:hi]
        pos = torch.arange(lo, hi).expand_as(s)
        # Sort by position descending first, then a stable sort by score descending.
        order = torch.argsort(pos, dim=1, descending=True)
        s2, pos2 = torch.gather(s, 1, order), torch.gather(pos, 1, order)
        o2 = torch.argsort(s2, dim=1, descending=True, stable=True)
        return torch.gather(pos2, 1, o2)[:, :n]

    def with_recent(scores, recent):
        kept = top(scores, budget - recent, 0, t - recent)
        tail = torch.arange(t - recent, t).expand(hkv, recent)
        return torch.sort(torch.cat([kept, tail], dim=1), dim=1).values

    out = {}
    # SNAPKV: the last w rows, mean over rows and the group's heads, pooled over the prefix.
    w = min(window, tq)
    s = a[:, tq - w:, :].mean(dim=1).view(hkv, g, t).mean(dim=1)  # [Hkv, T]
    prefix = t - w
    pooled = s.clone()
    half = kernel // 2
    padded = torch.nn.functional.pad(s[:, :prefix], (half, half))
    pooled[:, :prefix] = padded.unfold(1, kernel, 1).sum(-1) / kernel
    out["snapkv"] = with_recent(pooled, min(w, budget)) if budget > w else torch.arange(t - budget, t).expand(hkv, budget)
    out["_snapkv_scores"] = pooled
    out["_snapkv_end"] = t - min(w, budget)
    # H2O: plain sum over every row and the group's heads; half recent.
    s = a.sum(dim=1).view(hkv, g, t).sum(dim=1)
    recent = min(budget, int(rho_recent * budget + 0.5))
    out["h2o"] = with_recent(s, recent)
    out["_h2o_scores"] = s
    out["_h2o_end"] = t - recent
    # kvpress's observed attention: sum over rows / (T - j), mean over the group, top B.
    s = a.sum(dim=1) / torch.arange(t, 0, -1, dtype=torch.float64)
    s = s.view(hkv, g, t).mean(dim=1)
    out["observed_attention"] = torch.sort(top(s, budget, 0, t), dim=1).values
    out["_observed_attention_scores"] = s
    out["_observed_attention_end"] = t
    return out


def overlap(a, b):
    """Per kv head |a & b| / |b| (kept sets [Hkv, B]); returns (mean, min)."""
    fr = []
    for h in range(a.shape[0]):
        sa, sb = set(a[h].tolist()), set(b[h].tolist())
        fr.append(len(sa & sb) / max(1, len(sb)))
    return sum(fr) / len(fr), min(fr)


def disagreement_gap(scores, a, b, end):
    """For tokens before `end` (the always-kept tail starts there) kept by exactly
    one of a, b: the largest |score - cutoff| / cutoff, with cutoff the smallest
    reference score among b's kept tokens before `end` (how close to a tie the
    disagreement is; 0 when a and b agree)."""
    worst = 0.0
    for h in range(a.shape[0]):
        sa, sb = set(a[h].tolist()), set(b[h].tolist())
        diff = sorted(x for x in sa ^ sb if x < end)
        if not diff:
            continue
        below = [scores[h, x].item() for x in sb if x < end]
        if not below:  # b keeps only its always-kept tail (budget <= window): no score decides
            return None
        cutoff = min(below)
        for x in diff:
            worst = max(worst, abs(scores[h, x].item() - cutoff) / abs(cutoff))
    return worst


# ---------------------------------------------------------------------------- commands


def cmd_run(args):
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import torch

    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or os.path.join(HERE, "out")
    os.makedirs(out_dir, exist_ok=True)
    layers, shape = load_cache(args.cache, torch)
    budget = uniform_budget(args.rho, shape["tokens"])
    result = {"cache": args.cache, "shape": shape, "rho": args.rho, "budget": budget, "threads": args.threads,
              "repeats": args.repeats, "warmup": args.warmup, "window": args.window, "kernel": args.kernel,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg(),
              "versions": {"torch": torch.__version__}}
    try:
        import importlib.metadata as md

        for p in ("kvpress", "transformers"):
            result["versions"][p] = md.version(p)
    except Exception:  # noqa: BLE001
        pass

    args.presses = [p for p, pol in (("snapkv", "snapkv"), ("observed_attention", "h2o")) if pol in args.policies]
    measures, kv_info, kv_kept, med_cmds = {}, {}, None, {}
    if not args.no_kvpress:
        m, kv_info, kv_kept = kvpress_side(torch, layers, shape, args, budget)
        measures.update(m)
    server = None
    try:
        if not args.no_medakv and not args.no_service:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            base = os.path.splitext(os.path.basename(args.cache))[0]
            server = Server(args.server_bin, env, os.path.join(out_dir, f"{base}.server.log"))
        if not args.no_medakv:
            m, med_cmds = medakv_side(args, shape, server, out_dir)
            measures.update(m)
        # Round robin: every measurement once per round, the order rotated each
        # round, so that both sides see the same share of a shared machine's load.
        keys = list(measures)
        samples = {k: [] for k in keys}
        for rnd in range(args.warmup + args.repeats):
            shift = rnd % len(keys)
            for k in keys[shift:] + keys[:shift]:
                x = measures[k]()
                if rnd >= args.warmup:
                    samples[k].append(x)
            if not args.quiet:
                print(f"round {rnd + 1}/{args.warmup + args.repeats} done", file=sys.stderr)
    finally:
        if server:
            server.stop()
    nl = shape["layers"]
    med = {}
    for (policy, path), (cmd, out_file) in med_cmds.items():
        med.setdefault(policy, {})[path] = summarize_medakv(samples[(policy, path)], cmd, out_file, nl, path)
    kv = {}
    if kv_info:
        kv = dict(kv_info, presses={name: summarize_kvpress(samples[("kvpress", name)], nl) for name in args.presses})
    result["medakv"] = med
    result["kvpress"] = kv
    result["load_average_end"] = os.getloadavg()

    # Agreement.
    agree = {}
    refs = [reference_kept(torch, l, budget, args.window, args.kernel) for l in layers] if not args.no_reference else None
    pairs = (("snapkv", "snapkv"), ("h2o", "observed_attention"))
    for policy, press in pairs:
        if policy not in args.policies:
            continue
        rows = []
        m_pos = read_positions(med[policy]["in_process"]["output"], shape["layers"], torch) if med else None
        if med and "service_shm" in med[policy]:
            same = all(open(med[policy][p]["output"], "rb").read() == open(med[policy]["in_process"]["output"], "rb").read()
                       for p in ("service_shm", "service_socket"))
            agree.setdefault(policy, {})["service_output_identical"] = same
        k_pos = kv_kept(press) if kv_kept else None
        for l in range(shape["layers"]):
            row = {"layer": l}
            if m_pos is not None and k_pos is not None:
                row["medakv_vs_kvpress"] = overlap(k_pos[l], m_pos[l])
            if refs is not None:
                r = refs[l]
                if m_pos is not None:
                    row["medakv_vs_ref"] = overlap(m_pos[l], r[policy])
                if k_pos is not None:
                    row["kvpress_vs_ref"] = overlap(k_pos[l], r[press])
                    row["kvpress_vs_ref_gap"] = disagreement_gap(r["_" + press + "_scores"], k_pos[l], r[press],
                                                                r["_" + press + "_end"])
                    if policy != press:  # where kvpress's observed attention puts its budget
                        t = shape["tokens"]
                        row["kvpress_share_in_last_half_budget"] = (k_pos[l] >= t - budget // 2).float().mean().item()
                        row["kvpress_share_in_window_rows"] = (k_pos[l] >= t - shape["q_tokens"]).float().mean().item()
                if m_pos is not None:
                    row["medakv_vs_ref_gap"] = disagreement_gap(r["_" + policy + "_scores"], m_pos[l], r[policy],
                                                               r["_" + policy + "_end"])
            rows.append(row)
        agree.setdefault(policy, {})["per_layer"] = rows
    result["agreement"] = agree
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if not args.quiet:
        print(text)


PRESS_OF = {"snapkv": ("snapkv", "SnapKVPress"), "h2o": ("observed_attention", "ObservedAttentionPress")}
PATH_NAME = {"in_process": "in process", "service_shm": "service, shared memory", "service_socket": "service, socket"}


def fmt_overlap(rows, key):
    xs = [r[key][0] for r in rows if key in r]
    if not xs:
        return ""
    return f"{sum(xs) / len(xs):.3f} (min {min(r[key][1] for r in rows if key in r):.3f})"


def cmd_table(args):
    results = []
    for p in args.results:
        with open(p) as f:
            results.append(json.load(f))
    results.sort(key=lambda r: r["shape"]["tokens"])
    lines = ["| policy / press | path | T | ms per layer | tokens/s | ratio medakv/kvpress | overlap with kvpress | vs float64 reference | cores used |",
             "|---|---|---|---|---|---|---|---|---|"]
    busy = []
    for policy in ("snapkv", "h2o"):
        for r in results:
            t, nl = r["shape"]["tokens"], r["shape"]["layers"]
            press, press_name = PRESS_OF[policy]
            kv = r.get("kvpress", {}).get("presses", {}).get(press)
            rows = r.get("agreement", {}).get(policy, {}).get("per_layer", [])
            kv_s = kv["seconds_per_layer_mean"] if kv else None
            if kv:
                detail = ""
                if "seconds_attention" in kv:
                    detail = f" (attention {kv['seconds_attention'] / nl * 1e3:.2f} + press {kv['seconds_press'] / nl * 1e3:.2f})"
                cores = kv["cpu_over_wall"]
                if cores < 0.75 * r["threads"]:
                    busy.append(f"kvpress {press_name} T={t}: {cores:.2f}")
                lines.append(f"| kvpress {press_name} | torch {r['kvpress']['dtype']}, {r['kvpress']['torch_threads']} threads | {t} | "
                             f"{kv_s * 1e3:.2f}{detail} | {t / kv_s:,.0f} | 1 | | {fmt_overlap(rows, 'kvpress_vs_ref')} | {cores:.2f} |")
            for path, m in r.get("medakv", {}).get(policy, {}).items():
                s = m["seconds_per_layer_mean"]
                note = ""
                if path != "in_process":
                    rt = m["seconds_round_trip"] / nl
                    shm = m.get("shared_memory") or []
                    used = ("" if path != "service_shm" or all(shm)
                            else f"; shared memory used in {sum(1 for x in shm if x)} of {len(shm)} calls")
                    note = f" (round trip {rt * 1e3:.2f}{used})"
                ratio = f"{s / kv_s:.2f}" if kv_s else ""
                if path != "in_process" and kv_s:
                    ratio += f" ({m['seconds_round_trip'] / nl / kv_s:.2f})"
                ov = fmt_overlap(rows, "medakv_vs_kvpress") if path == "in_process" else ""
                ref = fmt_overlap(rows, "medakv_vs_ref") if path == "in_process" else ""
                cores = m.get("cpu_over_compute", m.get("server_cpu_over_compute"))
                if cores < 0.75 * r["threads"]:
                    busy.append(f"medakv {policy} {path} T={t}: {cores:.2f}")
                lines.append(f"| medakv {policy.upper()} | {PATH_NAME[path]} | {t} | {s * 1e3:.2f}{note} | {t / s:,.0f} | {ratio} | {ov} | {ref} | {cores:.2f} |")
    print("\n".join(lines))
    if busy:
        n = len(lines) - 2
        print(f"\nWARNING: {len(busy)} of {n} rows used fewer than 0.75 x {results[0]['threads']} cores "
              f"(CPU time over wall time; lowest: {min(busy, key=lambda x: float(x.rsplit(' ', 1)[1]))}): "
              "the machine was busy. Compare rows of this run only, or run again on an idle machine.")
    if args.details:
        print()
        for r in results:
            print(f"T={r['shape']['tokens']}: {r['shape']}, rho {r['rho']} (budget {r['budget']}), {r['threads']} threads, "
                  f"{r['repeats']} repeats, load average {r['load_average']} -> {r.get('load_average_end')}")
            kv = r.get("kvpress", {})
            if kv:
                print(f"  kvpress: compression_ratio {kv['compression_ratio']:.6f} keeps {kv['n_kept']} "
                      f"(1 - rho literally: {kv['n_kept_literal_rho']}); window {kv['window']}; cast {kv['cast_seconds']:.3f} s; "
                      + ", ".join(f"{n} cpu/wall {v['cpu_over_wall']:.2f}" for n, v in kv["presses"].items()))
            for policy, paths in r.get("medakv", {}).items():
                for path, m in paths.items():
                    c = m.get("cpu_over_compute", m.get("server_cpu_over_compute"))
                    print(f"  medakv {policy} {path}: statistics {m['seconds_statistics'] * 1e3:.1f} ms, select+merge "
                          f"{m['seconds_select_merge'] * 1e3:.1f} ms, wall {m['seconds_wall'] * 1e3:.1f} ms, "
                          f"cpu/compute {c:.2f}" + (f", receive {m['seconds_receive'] * 1e3:.1f} ms, send {m['seconds_send'] * 1e3:.1f} ms"
                                                   if "seconds_receive" in m else ""))
            for policy, a in r.get("agreement", {}).items():
                for row in a.get("per_layer", []):
                    items = ", ".join(f"{k} {v[0]:.3f}" if isinstance(v, (list, tuple))
                                      else f"{k} n/a" if v is None else f"{k} {v:.3g}"
                                      for k, v in row.items() if k != "layer")
                    print(f"  {policy} layer {row['layer']}: {items}")
                if "service_output_identical" in a:
                    print(f"  {policy}: service outputs identical to in-process: {a['service_output_identical']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="time kvpress and medakv on one cache file; print (or write) a JSON result")
    r.add_argument("cache")
    r.add_argument("--rho", type=float, default=0.2, help="fraction kept (kvpress compression_ratio = 1 - rho)")
    r.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and OMP_NUM_THREADS [2]")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--window", type=int, default=64, help="SnapKV window (query rows) [64]")
    r.add_argument("--kernel", type=int, default=5, help="SnapKV pooling kernel [5]")
    r.add_argument("--policies", default="snapkv,h2o", type=lambda s: s.split(","))
    r.add_argument("--kvpress-dtype", default="float32", choices=["float32", "native", "float16", "bfloat16"],
                   help="dtype kvpress computes in: float32 (default; the file's tensors upcast once, not timed), "
                        "or the file's own (torch's fp16 matmul on CPU is ~25x slower than fp32)")
    r.add_argument("--literal-ratio", action="store_true",
                   help="compression_ratio = 1 - rho exactly (kvpress may then keep one token fewer than medakv); "
                        "default: the ratio that keeps medakv's budget round(rho*T)")
    r.add_argument("--medakv", default=os.path.join(ROOT, "build/client/cli/medakv"))
    r.add_argument("--server-bin", default=os.path.join(ROOT, "build/service/server/medakv-server"))
    r.add_argument("--no-medakv", action="store_true")
    r.add_argument("--no-service", action="store_true")
    r.add_argument("--no-kvpress", action="store_true")
    r.add_argument("--no-reference", action="store_true", help="skip the float64 references")
    r.add_argument("--out-dir", help="medakv's output files and the server's log [bench/peer/out]")
    r.add_argument("--json", help="write the result here")
    r.add_argument("-q", "--quiet", action="store_true")
    t = sub.add_parser("table", help="markdown table from run results")
    t.add_argument("results", nargs="+")
    t.add_argument("--details", action="store_true", help="also per-stage times, thread checks, per-layer overlaps")
    args = ap.parse_args()
    if args.cmd == "run":
        need = [] if args.no_medakv else [args.medakv] + ([] if args.no_service else [args.server_bin])
        for b in need:
            if not (os.path.exists(b) or shutil.which(b)):
                sys.exit(f"{b}: not found (build medakv first)")
        cmd_run(args)
    else:
        cmd_table(args)


if __name__ == "__main__":
    main()
