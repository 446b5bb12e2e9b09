#!/usr/bin/env python3
"""An inference worker's side of medakv: compress a multimodal prompt's KV cache on the server.

After the prefill of a prompt (system text, one image, the user's question),
a worker holds per layer the keys and values of every prompt token and the
queries of the last prompt rows. This example builds such a cache with the
shapes of a small LLaVA-style model (GQA, fp16, 576 image tokens), sends it
to medakv-server, and prints what compression saved and what each layer
kept. The cache is synthetic but shaped like a real one: image patches come
in clusters of near-duplicates (what MEDA's merging absorbs), a few tokens
draw most of the attention, and the layers differ in how focused their
attention is (what MEDA's entropy-guided budgets follow).

    scripts/serve.sh &                                   # or any medakv-server
    python3 client/python/examples/inference_worker.py --server 127.0.0.1:50051
    python3 client/python/examples/inference_worker.py --policy snapkv --rho 0.1 --torch

With a real model, `medakv.hf.from_hf_cache(outputs.past_key_values, queries)`
gives the same arguments from a transformers cache, and
`medakv.hf.to_hf_cache(result)` turns the result back into per-layer
(key, value) tensors for decoding.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import medakv


def build_cache(layers: int, kv_heads: int, q_heads: int, head_dim: int, text_before: int, image_tokens: int,
                text_after: int, q_rows: int, seed: int):
    """keys, values, queries per layer ([heads, tokens, head_dim], float16) and the image's span."""
    rng = np.random.default_rng(seed)
    tokens = text_before + image_tokens + text_after
    image = slice(text_before, text_before + image_tokens)
    keys, values, queries = [], [], []
    for layer in range(layers):
        k = rng.standard_normal((kv_heads, tokens, head_dim)).astype(np.float32)
        v = rng.standard_normal((kv_heads, tokens, head_dim)).astype(np.float32)
        # Image patches: 36 clusters of near-duplicate keys and values.
        centers = rng.standard_normal((kv_heads, 36, head_dim)).astype(np.float32)
        cluster = rng.integers(0, 36, image_tokens)
        k[:, image] = centers[:, cluster] + 0.05 * rng.standard_normal((kv_heads, image_tokens, head_dim))
        v[:, image] = centers[:, cluster] + 0.05 * rng.standard_normal((kv_heads, image_tokens, head_dim))
        # Queries lean towards a few heavy-hitter keys; how strongly differs by layer.
        focus = 0.5 + 3.0 * rng.random()
        heavy = rng.choice(tokens, 8, replace=False)
        group = q_heads // kv_heads
        q = rng.standard_normal((q_heads, q_rows, head_dim)).astype(np.float32)
        for h in range(q_heads):
            q[h] += focus * k[h // group, heavy].mean(axis=0)
        keys.append(k.astype(np.float16))
        values.append(v.astype(np.float16))
        queries.append(q.astype(np.float16))
    return keys, values, queries, (image.start, image_tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="127.0.0.1:50051", help="medakv-server host:port")
    p.add_argument("--policy", default="meda", choices=medakv.POLICIES)
    p.add_argument("--rho", type=float, default=0.2, help="fraction of the cache to keep")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--image-tokens", type=int, default=576, help="24 x 24 patches")
    p.add_argument("--q-rows", type=int, default=32, help="query rows sent (the last prompt positions)")
    p.add_argument("--torch", action="store_true", help="send torch tensors (needs PyTorch)")
    p.add_argument("--timeout", type=float, default=120, help="deadline of each call, seconds")
    args = p.parse_args(argv)

    keys, values, queries, (image_start, image_len) = build_cache(
        args.layers, args.kv_heads, args.q_heads, args.head_dim, text_before=40, image_tokens=args.image_tokens,
        text_after=100, q_rows=args.q_rows, seed=7)
    if args.torch:
        import torch

        keys, values, queries = ([torch.from_numpy(x) for x in xs] for xs in (keys, values, queries))
    tokens = keys[0].shape[1]

    with medakv.Client(args.server, timeout=args.timeout) as client:
        try:
            status = client.health()
            t0 = time.perf_counter()
            result = client.compress(keys, values, queries, modality=[(image_start, image_len)],
                                     policy=args.policy, rho=args.rho)
            round_trip = time.perf_counter() - t0
        except medakv.MedakvError as e:
            print(f"inference_worker: {e}", file=sys.stderr)
            return 1

    mib = 1 / (1 << 20)
    s = result.summary
    print(f"server {args.server}: {status}, backend {s.backend}")
    print(f"cache: {len(keys)} layers x {tokens} tokens ({image_len} image tokens at {image_start}), "
          f"{args.kv_heads} kv heads, {args.q_heads} query heads, head_dim {args.head_dim}, float16")
    print(f"policy {args.policy}, rho {args.rho}: kept {result.tokens_kept} of {s.tokens_in} tokens "
          f"({100 * result.kept_fraction:.1f}%), KV {result.kv_bytes_in * mib:.2f} MiB -> "
          f"{result.kv_bytes_out * mib:.2f} MiB, saved {(result.kv_bytes_in - result.kv_bytes_out) * mib:.2f} MiB")
    t = s.times
    print(f"time: round trip {round_trip:.3f} s; server: receive {t.receive_seconds:.3f} s, statistics "
          f"{t.statistics_seconds:.3f} s, select+merge {t.select_merge_seconds:.3f} s, send {t.send_seconds:.3f} s")
    print("layer  budget  entropy    alpha  image rows kept (head 0)")
    for layer in result.layers:
        positions = np.asarray(layer.positions.cpu() if args.torch else layer.positions)[0]
        kept_image = int(np.count_nonzero((positions >= image_start) & (positions < image_start + image_len)))
        print(f"{layer.layer:5d}  {layer.budget:6d}  {layer.entropy:7.4f}  {layer.alpha:7.4f}  {kept_image:5d}")
    lengths = [k.shape[2] for k, _ in medakv.hf.to_hf_cache(result)]
    print(f"for decoding: per-layer (key, value) of lengths {lengths}, positions continue at {tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
