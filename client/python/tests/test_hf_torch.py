"""medakv.hf with torch and transformers: capture, compress, CompressedCache under generate(), reuse, misuse.

Tiny random-weight models built from configs (no download): Llama (the
SmolLM2 family), Gemma 3 (sliding-window layers shorter than the context,
q/k norms), Qwen2, Qwen3, Mistral. Every compression goes through the real
medakv-server of the test session. The real SmolLM2 runs in
test_hf_quickstart.py.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest

if os.environ.get("MEDAKV_REQUIRE_HF") != "1":
    pytest.importorskip("torch")
    pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402

import medakv  # noqa: E402
import medakv.hf as hf  # noqa: E402

VOCAB = 97
CONTEXT, QUESTION, NEW = 60, 7, 8
POLICIES = ["amber", "meda", "h2o", "snapkv", "pyramidkv", "streaming_llm", "look_m"]


def make_model(family: str, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, sliding_window=24, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                         "sliding_attention"])
        model = transformers.Gemma3ForCausalLM(cfg)
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    else:
        raise AssertionError(family)
    model.eval()
    model.set_attn_implementation(attn)
    return model


def ids(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)  # no pad, bos or eos token


def generate(model, input_ids, cache=None, n=NEW):
    kw = {} if cache is None else {"past_key_values": cache}
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences[0, input_ids.shape[1]:], torch.stack([x[0] for x in out.logits])


# ---- capture ----------------------------------------------------------------------------------------

def reference_queries(model, input_ids):
    """Post-RoPE queries rebuilt from q_proj's output, the module's q_norm and the rotary embedding it is given."""
    modules = hf.attention_modules(model)
    got, handles = {}, []
    for layer, m in modules.items():
        def pre(mod, args, kwargs, layer=layer):
            got.setdefault(layer, {})["rope"] = kwargs["position_embeddings"]

        def proj(mod, args, out, layer=layer):
            got.setdefault(layer, {})["q"] = out.detach()
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.q_proj.register_forward_hook(proj))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer, m in sorted(modules.items()):
        b, t, _ = got[layer]["q"].shape
        q = got[layer]["q"].view(b, t, -1, m.head_dim)
        if hasattr(m, "q_norm"):
            q = m.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = got[layer]["rope"]
        rotate = sys.modules[type(m).__module__].apply_rotary_pos_emb
        q, _ = rotate(q, q, cos, sin)
        out.append(q)
    return out, logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "qwen3", "mistral"])
def test_capture_equals_post_rope_queries(family, attn):
    model = make_model(family, attn)
    x = ids(1, 33)
    want, want_logits = reference_queries(model, x)
    with torch.no_grad(), hf.capture_queries(model, keys=True) as cap:
        logits = model(input_ids=x, use_cache=False).logits
    assert torch.equal(logits, want_logits)  # the model runs as without the capture
    assert len(cap.queries) == len(want) == 4
    for q, w in zip(cap.queries, want):
        assert q.shape == (1, 4, 33, 16)
        assert torch.equal(q, w)
    assert [k.shape for k in cap.keys] == [(1, 2, 33, 16)] * 4 and len(cap.values) == 4


def test_capture_joins_chunked_forward_passes_and_records_only_inside_the_block():
    model = make_model("llama")
    x = ids(2, 30)
    with torch.no_grad():
        with hf.capture_queries(model) as whole:
            model(input_ids=x, use_cache=False)
        cache = transformers.DynamicCache(config=model.config)
        with hf.capture_queries(model) as parts:
            model(input_ids=x[:, :17], past_key_values=cache)
            model(input_ids=x[:, 17:], past_key_values=cache)
        model(input_ids=x, use_cache=False)  # outside any block: recorded nowhere
    assert all(p.shape == w.shape for p, w in zip(parts.queries, whole.queries))
    for p, w in zip(parts.queries, whole.queries):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-6)
    with hf.capture_queries(model) as empty:
        pass
    assert empty.queries == []


# ---- generate over a CompressedCache ------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_full_policy_generates_the_uncompressed_models_tokens(client, family, attn):
    model = make_model(family, attn)
    context, question = ids(3, CONTEXT), ids(4, QUESTION)
    prompt = torch.cat([context, question], -1)
    want, want_logits = generate(model, prompt)
    cache = hf.compress(model, context, client=client, policy="full", rho=1.0)
    assert cache.kept == [CONTEXT] * 4 and cache.get_seq_length() == CONTEXT
    got, logits = generate(model, prompt, cache)
    assert torch.equal(got, want)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == CONTEXT + QUESTION + NEW - 1


class NaiveDecode:
    """The reference: a registered attention function, no cache. Each layer attends to the compressed
    context's kept rows at their original positions, then to the new tokens, one query head and one row at
    a time in float64, causal by position and within the sliding window by position."""

    NAME = "medakv_test_naive"

    def __init__(self, result, start: int):
        self.layers = [(torch.as_tensor(r.key, dtype=torch.float64), torch.as_tensor(r.value, dtype=torch.float64),
                        torch.as_tensor(r.positions, dtype=torch.int64)) for r in result.layers]
        self.start = start

    def __call__(self, module, query, key, value, attention_mask, scaling=None, sliding_window=None, softcap=None,
                 **kwargs):
        kk, vv, pp = self.layers[module.layer_idx]
        n, hq, hkv = query.shape[2], query.shape[1], key.shape[1]
        qpos = list(range(self.start, self.start + n))
        out = torch.zeros(1, n, hq, query.shape[3], dtype=torch.float64)
        for h in range(hq):
            g = h // (hq // hkv)
            held = pp[g] >= 0  # rows at position -1 pad a head that keeps fewer tokens: not kept rows
            keys = torch.cat([kk[g][held], key[0, g].double()])
            values = torch.cat([vv[g][held], value[0, g].double()])
            pos = torch.cat([pp[g][held], torch.tensor(qpos)])
            for i, p in enumerate(qpos):
                seen = pos <= p
                if sliding_window is not None:
                    seen &= (p - pos) < sliding_window
                s = (keys[seen] @ query[0, h, i].double()) * scaling
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                out[0, i, h] = torch.softmax(s, 0) @ values[seen]
        return out.to(query.dtype), None

    def logits(self, model, tokens):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)
        before = model.config._attn_implementation
        model.set_attn_implementation(self.NAME)
        try:
            with torch.no_grad():
                pos = torch.arange(self.start, self.start + tokens.shape[1]).unsqueeze(0)
                return model(input_ids=tokens, position_ids=pos, use_cache=False).logits[0]
        finally:
            model.set_attn_implementation(before)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_generate_over_a_compressed_cache_equals_a_naive_decode(client, family, attn, policy):
    model = make_model(family, attn, seed=5)
    context, question = ids(6, CONTEXT), ids(7, QUESTION)
    prompt = torch.cat([context, question], -1)
    cache = hf.compress(model, context, client=client, policy=policy, rho=0.3)
    assert all(k < CONTEXT for k in cache.kept)
    tokens, logits = generate(model, prompt, cache.copy())
    naive = NaiveDecode(cache.result, CONTEXT)
    fed = torch.cat([question, tokens[None, :-1]], -1)
    want = naive.logits(model, fed)[QUESTION - 1:]
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_heads_of_different_lengths_decode_like_a_naive_decode(client, family, attn):
    """amber's global budgets: each kv head keeps its own number of tokens, a layer padded to its widest head
    (position -1): generate() never attends a padded row."""
    model = make_model(family, attn, seed=8)
    context, question = ids(9, CONTEXT), ids(10, QUESTION)
    cache = hf.compress(model, context, client=client, policy="amber", rho=0.3, layer_budget="global",
                        score_norm="max", recent_search_rows=0, sinks=2, probe="reconstruct")
    per_head = cache.kept_per_head
    assert sum(map(sum, per_head)) == round(0.3 * 4 * 2 * CONTEXT)
    assert any(len(set(heads)) > 1 for heads in per_head)  # some layer's heads differ: padding exists
    assert cache.kept == [max(heads) for heads in per_head]
    assert all((cache.positions(i)[h, n:] == -1).all() for i, heads in enumerate(per_head)
               for h, n in enumerate(heads))
    prompt = torch.cat([context, question], -1)
    tokens, logits = generate(model, prompt, cache.copy())
    naive = NaiveDecode(cache.result, CONTEXT)
    fed = torch.cat([question, tokens[None, :-1]], -1)
    torch.testing.assert_close(logits, naive.logits(model, fed)[QUESTION - 1:], rtol=0, atol=1e-5)


def test_sliding_window_hides_kept_keys_by_their_original_position(client):
    """A Gemma sliding layer: the kept keys a query may see are those within the window of its position."""
    model = make_model("gemma3", "eager", seed=8)
    context = ids(9, CONTEXT)
    cache = hf.compress(model, context, client=client, policy="streaming_llm", rho=0.5)
    pos = cache.positions(0)
    assert bool((pos < CONTEXT - 24).any())  # kept keys outside the window of the first new token
    tokens, logits = generate(model, torch.cat([context, ids(10, 3)], -1), cache.copy(), n=3)
    naive = NaiveDecode(cache.result, CONTEXT)
    want = naive.logits(model, torch.cat([ids(10, 3), tokens[None, :-1]], -1))[2:]
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    # The window matters here: attending to every kept key gives other logits.
    no_window = _logits_without_window(model, cache, torch.cat([ids(10, 3), tokens[None, :-1]], -1))[2:]
    assert (no_window - want).abs().max() > 1e-4


def _logits_without_window(model, cache, tokens):
    class NoWindow(NaiveDecode):
        NAME = "medakv_test_naive_no_window"

        def __call__(self, module, query, key, value, attention_mask, sliding_window=None, **kw):
            return super().__call__(module, query, key, value, attention_mask, sliding_window=None, **kw)
    return NoWindow(cache.result, CONTEXT).logits(model, tokens)


def test_a_forward_loop_of_ones_own_decodes_like_generate(client):
    model = make_model("gemma3", "sdpa", seed=11)
    context, question = ids(12, CONTEXT), ids(13, QUESTION)
    cache = hf.compress(model, context, client=client, policy="amber", rho=0.25)
    want, want_logits = generate(model, torch.cat([context, question], -1), cache.copy(), n=4)
    loop = cache.copy()
    step, got, logits = question, [], []
    with torch.no_grad():
        for _ in range(4):
            out = model(input_ids=step, past_key_values=loop).logits[0, -1]
            logits.append(out)
            got.append(int(out.argmax()))
            step = torch.tensor([[got[-1]]])
    assert got == want.tolist()
    torch.testing.assert_close(torch.stack(logits), want_logits, rtol=0, atol=1e-5)


def test_one_compression_answers_several_questions(client):
    model = make_model("llama", "sdpa", seed=14)
    context = ids(15, CONTEXT)
    questions = [ids(16, 5), ids(17, 9)]
    once = hf.compress(model, context, client=client, policy="amber", rho=0.3)
    before = [layer.keys.clone() for layer in once.layers]
    for q in questions:
        prompt = torch.cat([context, q], -1)
        got, got_logits = generate(model, prompt, once.copy())
        fresh = hf.compress(model, context, client=client, policy="amber", rho=0.3)
        want, want_logits = generate(model, prompt, fresh)
        assert torch.equal(got, want) and torch.equal(got_logits, want_logits)
    assert all(torch.equal(layer.keys, b) for layer, b in zip(once.layers, before))  # copies left it untouched
    assert once.get_seq_length() == CONTEXT


def test_sizes_and_result(client):
    model = make_model("llama", seed=18)
    cache = hf.compress(model, ids(19, CONTEXT), client=client, policy="meda", rho=0.25)
    assert cache.context_length == CONTEXT
    assert cache.full_nbytes == 4 * 2 * 2 * CONTEXT * 16 * 4
    assert cache.context_nbytes == sum(2 * 2 * k * 16 * 4 for k in cache.kept) == cache.nbytes
    assert cache.kept == [r.budget for r in cache.result.layers]
    assert cache.result.summary.policy.WhichOneof("kind") == "meda"
    assert cache.result.summary.tokens_kept == sum(cache.kept)  # summed over layers, per kv head


def test_default_client_reads_medakv_server(monkeypatch, server):
    model = make_model("llama", seed=20)
    monkeypatch.setenv("MEDAKV_SERVER", server.address)
    cache = hf.compress(model, ids(21, 40).tolist()[0], rho=0.5)  # a list of ids works too
    assert cache.context_length == 40
    monkeypatch.setenv("MEDAKV_SERVER", "127.0.0.1:1")
    with pytest.raises(medakv.MedakvError, match="UNAVAILABLE"):
        hf.compress(model, ids(21, 40))
    monkeypatch.setenv("MEDAKV_SERVER", "a:1,b:2")
    with pytest.raises(ValueError, match="one server"):
        hf.compress(model, ids(21, 40))


# ---- misuse -----------------------------------------------------------------------------------------

@pytest.fixture()
def compressed(client):
    model = make_model("llama", seed=22)
    context = ids(23, CONTEXT)
    return model, context, hf.compress(model, context, client=client, policy="h2o", rho=0.3)


def test_another_model_is_refused(compressed):
    _, context, cache = compressed
    other = make_model("llama", seed=99)  # same shapes, other weights
    with pytest.raises(ValueError, match="differ from those of the LlamaForCausalLM"):
        generate(other, torch.cat([context, ids(24, 3)], -1), cache.copy())
    gemma = make_model("gemma3")
    with pytest.raises(ValueError, match="differ|another model"):
        generate(gemma, torch.cat([context, ids(24, 3)], -1), cache.copy())


def test_input_ids_must_start_with_the_context(compressed):
    model, context, cache = compressed
    with pytest.raises(ValueError, match="do not start with the 60 tokens of the compressed context"):
        generate(model, torch.cat([ids(25, CONTEXT), ids(24, 3)], -1), cache.copy())
    with pytest.raises(ValueError, match="already holds 60 positions"):
        generate(model, ids(24, 5), cache.copy())
    with pytest.raises(ValueError, match="already holds 60 positions"):
        generate(model, context, cache.copy())
    empty = torch.zeros(1, 2, 0, 16)
    with pytest.raises(ValueError, match="no new tokens"):
        cache.copy().update(empty, empty, 0)
    # A deep copy of the model checks its own input ids, and decodes like the original.
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match="do not start with the 60 tokens"):
        generate(twin, torch.cat([ids(25, CONTEXT), ids(24, 3)], -1), cache.copy())
    prompt = torch.cat([context, ids(24, 3)], -1)
    assert torch.equal(generate(twin, prompt, cache.copy())[0], generate(model, prompt, cache.copy())[0])


def test_an_attention_call_that_bypasses_the_wrapper_is_caught(compressed):
    _, _, cache = compressed
    new = torch.zeros(1, 2, 1, 16)
    mine = cache.copy()
    mine.update(new, new, 0)                      # keys handed to layer 0, no attention call takes them
    cache.copy().update(new, new, 0)              # another cache: the first one's entry is dropped, not an error
    mine.update(new, new, 0)
    with pytest.raises(RuntimeError, match="did not go through medakv's attention wrapper"):
        mine.update(new, new, 0)


def test_batch_and_padding_are_refused(compressed):
    model, context, cache = compressed
    prompt = torch.cat([context, ids(24, 3)], -1)
    with pytest.raises(ValueError, match="batch of 2 sequences, but the cache holds 1"):
        with torch.no_grad():
            model(input_ids=ids(24, 3).repeat(2, 1), past_key_values=cache.copy())
    mask = torch.ones_like(prompt)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="no padding"):
        model.generate(prompt, attention_mask=mask, past_key_values=cache.copy(), max_new_tokens=2)


def test_argument_errors(client, compressed):
    model, context, _ = compressed
    with pytest.raises(ValueError, match="one context at a time"):
        hf.compress(model, context.repeat(2, 1), client=client)
    with pytest.raises(ValueError, match="empty context"):
        hf.compress(model, context[:, :0], client=client)
    with pytest.raises(TypeError, match="integer token ids"):
        hf.compress(model, context.float(), client=client)
    with pytest.raises(ValueError, match="query_rows"):
        hf.compress(model, context, client=client, query_rows=0)
    with pytest.raises(ValueError, match="rho"):
        hf.compress(model, context, client=client, rho=1.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        hf.compress(model, context, client=client, nonsense=1)
    with pytest.raises(TypeError, match="NumPy"):
        import numpy as np
        r = client.compress([np.zeros((2, 8, 16), np.float32)] * 4, [np.zeros((2, 8, 16), np.float32)] * 4,
                            [np.zeros((4, 8, 16), np.float32)] * 4)
        hf.CompressedCache.from_result(r, model)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf.nope  # noqa: B018


def test_query_rows_sends_only_the_last_rows(client, compressed):
    model, context, _ = compressed
    # SnapKV scores with the last `window` rows only: sending just those selects the same tokens.
    some = hf.compress(model, context, client=client, policy="snapkv", rho=0.3, window=16, query_rows=16)
    every = hf.compress(model, context, client=client, policy="snapkv", rho=0.3, window=16)
    assert some.kept == every.kept
    assert all(torch.equal(some.positions(i), every.positions(i)) for i in range(4))
    fewer = hf.compress(model, context, client=client, policy="h2o", rho=0.3, query_rows=8)
    more = hf.compress(model, context, client=client, policy="h2o", rho=0.3)
    assert any(not torch.equal(fewer.positions(i), more.positions(i)) for i in range(4))  # H2O sums every row


# ---- probes: rows after the context score the cache ---------------------------------------------------

def reference_outside_lse(model, queries, keys, T):
    """Each probe row's log-sum-exp over the probe's own keys it attends, one row and head at a time: row r
    (position T + r) sees keys T .. T + r, within the layer's sliding window where it has one."""
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or []
    out = []
    for layer, (q, k) in enumerate(zip(queries, keys)):  # q [q_heads, rows, d] at T.., k [kv_heads, T + rows, d]
        window = cfg.sliding_window if layer < len(types) and types[layer] == "sliding_attention" else None
        group = q.shape[0] // k.shape[0]
        lse = torch.empty(q.shape[0], q.shape[1])
        for h in range(q.shape[0]):
            for r in range(q.shape[1]):
                p = T + r
                seen = [j for j in range(T, p + 1) if window is None or p - j < window]
                logits = torch.stack([(q[h, r].double() @ k[h // group, j].double()) / q.shape[-1] ** 0.5
                                      for j in seen])
                lse[h, r] = torch.logsumexp(logits, 0).float()
        out.append(lse)
    return out


def test_outside_lse_is_each_rows_log_sum_exp_over_the_keys_it_attends():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(6, 9, 8, generator=g), torch.randn(2, 14, 8, generator=g)  # 3 query heads per kv head
    for first, window in ((5, None), (0, None), (5, 4)):
        got = hf.outside_lse(q, k, first, 0.3, window)
        assert got.shape == (6, 9) and got.dtype == torch.float32
        for h in range(6):
            for r in range(9):
                i = first + r
                seen = [j for j in range(i + 1) if window is None or i - j < window]
                want = torch.logsumexp(torch.stack([0.3 * (q[h, r].double() @ k[h // 3, j].double()) for j in seen]), 0)
                assert abs(float(got[h, r]) - float(want)) < 1e-4, (first, window, h, r)


def reference_request(model, context, after):
    """What a probe request must carry, built another way: the keys and values of the context's prefill
    alone, the post-RoPE query rows of `after` run behind it (rebuilt from q_proj) at positions T, T+1, ...,
    and each row's log-sum-exp over the keys of `after` it attends."""
    T = context.shape[1]
    with torch.no_grad(), hf.capture_queries(model, keys=True) as prefill:
        model(input_ids=context, use_cache=False)
    full = torch.cat([context, after], -1)
    queries, _ = reference_queries(model, full)
    with torch.no_grad(), hf.capture_queries(model, keys=True) as whole:
        model(input_ids=full, use_cache=False)
    rows = [q[0, :, T:] for q in queries]
    return ([k[0] for k in prefill.keys], [v[0] for v in prefill.values], rows,
            torch.arange(T, T + after.shape[1]), reference_outside_lse(model, rows, [k[0] for k in whole.keys], T))


def same_tokens(a, b):
    return a.kept == b.kept and all(torch.equal(a.positions(i), b.positions(i)) for i in range(len(a.kept)))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("policy", ["h2o", "snapkv", "amber"])
def test_question_probe_scores_the_context_with_the_questions_rows(client, family, policy):
    model = make_model(family, seed=30)
    context, question = ids(31, CONTEXT), ids(32, QUESTION)
    got = hf.compress(model, context, client=client, policy=policy, rho=0.3, probe="question", probe_ids=question)
    keys, values, queries, positions, outside = reference_request(model, context, question)
    want = client.compress(keys, values, queries, query_positions=positions, query_outside_lse=outside,
                           policy=policy, rho=0.3)
    assert [tuple(q.shape) for q in queries] == [(4, QUESTION, 16)] * 4
    assert same_tokens(got, hf.CompressedCache.from_result(want, model))
    assert got.context_length == CONTEXT and got.get_seq_length() == CONTEXT
    plain = hf.compress(model, context, client=client, policy=policy, rho=0.3)
    assert not same_tokens(got, plain)  # the question's rows chose other tokens than the context's own
    # The cache holds the context alone: a question decodes over it like over any compressed cache.
    prompt = torch.cat([context, question], -1)
    assert generate(model, prompt, got.copy())[0].shape == (NEW,)


def test_reconstruct_probe_repeats_the_context_or_runs_the_given_pass(client):
    model = make_model("llama", seed=33)
    context = ids(34, CONTEXT)
    got = hf.compress(model, context, client=client, policy="h2o", rho=0.25, probe="reconstruct")
    keys, values, queries, positions, outside = reference_request(model, context, context)
    assert positions[-1] == 2 * CONTEXT - 1
    want = client.compress(keys, values, queries, query_positions=positions, query_outside_lse=outside,
                           policy="h2o", rho=0.25)
    assert same_tokens(got, hf.CompressedCache.from_result(want, model))

    prompted = torch.cat([ids(35, 6), context], -1)  # an instruction, then the context: more rows than tokens
    got = hf.compress(model, context, client=client, policy="h2o", rho=0.25, probe="reconstruct",
                      probe_ids=prompted[0].tolist())
    keys, values, queries, positions, outside = reference_request(model, context, prompted)
    assert queries[0].shape[1] == CONTEXT + 6 > CONTEXT
    want = client.compress(keys, values, queries, query_positions=positions, query_outside_lse=outside,
                           policy="h2o", rho=0.25)
    assert same_tokens(got, hf.CompressedCache.from_result(want, model))

    last = hf.compress(model, context, client=client, policy="h2o", rho=0.25, probe="reconstruct",
                       probe_ids=prompted, query_rows=9)  # only the pass's last 9 rows
    want = client.compress(keys, values, [q[:, -9:] for q in queries], query_positions=positions[-9:],
                           query_outside_lse=[o[:, -9:] for o in outside], policy="h2o", rho=0.25)
    assert same_tokens(last, hf.CompressedCache.from_result(want, model))
    # Without the attention the pass gives its own tokens, other tokens are kept.
    plain = client.compress(keys, values, queries, query_positions=positions, policy="h2o", rho=0.25)
    assert not same_tokens(got, hf.CompressedCache.from_result(plain, model))


def test_probe_argument_errors(client, compressed):
    model, context, _ = compressed
    with pytest.raises(ValueError, match="probe: expected one of 'context', 'question', 'reconstruct', got 'kvzip'"):
        hf.compress(model, context, client=client, probe="kvzip")
    with pytest.raises(ValueError, match="needs probe_ids"):
        hf.compress(model, context, client=client, probe="question")
    with pytest.raises(ValueError, match='only with probe="question" or probe="reconstruct"'):
        hf.compress(model, context, client=client, probe_ids=ids(1, 3))
    with pytest.raises(ValueError, match="probe_ids: empty"):
        hf.compress(model, context, client=client, probe="question", probe_ids=ids(1, 3)[:, :0])
    with pytest.raises(TypeError, match="probe_ids: expected integer token ids"):
        hf.compress(model, context, client=client, probe="reconstruct", probe_ids=ids(1, 3).float())
    with pytest.raises(ValueError, match=r"probe_ids: expected \[tokens\] or \[1, tokens\]"):
        hf.compress(model, context, client=client, probe="question", probe_ids=ids(1, 3).repeat(2, 1))
    with pytest.raises(ValueError, match="probe: expected one of"):
        hf.Pipeline(model, None, probe="nope")
