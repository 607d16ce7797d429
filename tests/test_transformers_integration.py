"""attn_implementation="hybridrag" and apply_hybrid_attention against transformers' eager attention, on tiny
decoder models built from configs (no downloads), float32, backend "auto"."""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.4")

from transformers import (AutoModelForCausalLM, DynamicCache, Gemma2Config, Gemma3TextConfig,  # noqa: E402
                          LlamaConfig, MistralConfig, Qwen2Config)

from hybridrag.integrations.transformers import (apply_hybrid_attention, hybrid_attention_forward,  # noqa: E402
                                                 register)

register()

WINDOW = 6  # smaller than every sequence below, so sliding layers really slide
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**COMMON, **kw),
    "mistral": lambda **kw: MistralConfig(sliding_window=WINDOW, **COMMON, **kw),
    # per-layer windows: layer 0 full, layer 1 sliding (max_window_layers=1)
    "qwen2-mixed": lambda **kw: Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                            **COMMON, **kw),
    # per-layer windows and a scale that is not D ** -0.5 (query_pre_attn_scalar)
    "gemma3-mixed": lambda **kw: Gemma3TextConfig(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=32,
                                                  layer_types=["sliding_attention", "full_attention"], **COMMON, **kw),
}
MODELS = list(CONFIGS)


def build_pair(name, **config_kwargs):
    """The same random weights as an eager model and as a hybridrag model (built with from_config)."""
    eager = AutoModelForCausalLM.from_config(CONFIGS[name](**config_kwargs), attn_implementation="eager").eval()
    hybrid = AutoModelForCausalLM.from_config(CONFIGS[name](**config_kwargs), attn_implementation="hybridrag").eval()
    hybrid.load_state_dict(eager.state_dict())
    assert hybrid.config._attn_implementation == "hybridrag"
    return eager, hybrid


def make_batch(padding, length=20, batch=3):
    """ids (B, T) and a 0/1 attention mask with left or right padding of several lengths (pads hold id 0)."""
    ids = torch.randint(3, COMMON["vocab_size"], (batch, length))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :7], mask[1, :1] = 0, 0
    elif padding == "right":
        mask[0, -7:], mask[2, -2:] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def assert_close(actual, expected, atol, rtol=0.0, what="values"):
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        err = (actual - expected).abs()
        bad = (err > atol + rtol * expected.abs()).nonzero()
        raise AssertionError(f"{what}: {len(bad)} of {err.numel()} differ, max error {err.max().item():.3g}, "
                             f"first at {bad[:3].tolist()}")


# ----------------------------------------------------------------------------------------------------------------
# forward, generate and training against eager


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_eager(name, padding):
    eager, hybrid = build_pair(name)
    ids, mask = make_batch(padding)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).logits
        actual = hybrid(ids, attention_mask=mask).logits
    valid = mask.bool()  # padded query rows are not compared: their outputs are meaningless
    assert_close(actual[valid], expected[valid], atol=1e-5, what=f"{name} logits ({padding} padding)")


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_with_cache_matches_eager(name):
    eager, hybrid = build_pair(name)
    ids, mask = make_batch("left", length=10)
    args = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = eager.generate(ids, **args)
    actual = hybrid.generate(ids, **args)
    assert actual.shape == (3, 18)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_greedy_generate_with_static_cache_matches_eager(name):
    # Static caches hand the attention all max_cache_len slots; the mask cuts them to the written ones.
    eager, hybrid = build_pair(name)
    ids, mask = make_batch("left", length=10)
    args = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(hybrid.generate(ids, **args), eager.generate(ids, **args))


def test_set_attn_implementation_switches_a_loaded_model():
    eager, _ = build_pair("mistral")
    ids, mask = make_batch("left")
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).logits
        eager.set_attn_implementation("hybridrag")
        assert eager.config._attn_implementation == "hybridrag"
        actual = eager(ids, attention_mask=mask).logits
    assert_close(actual[mask.bool()], expected[mask.bool()], atol=1e-5, what="logits")


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3-mixed"])
def test_training_gradients_match_eager(name):
    eager, hybrid = build_pair(name)
    ids, mask = make_batch("right", length=16)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (eager, hybrid):
        model.train()
        model(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for param_name, expected in grads[0].items():
        actual = grads[1][param_name]
        assert actual is not None, param_name
        assert_close(actual, expected, atol=2e-5, rtol=1e-4, what=f"grad of {param_name}")


# ----------------------------------------------------------------------------------------------------------------
# what the kernels do not compute is refused, naming it


def test_softcap_is_refused():
    model = AutoModelForCausalLM.from_config(Gemma2Config(head_dim=16, sliding_window=WINDOW, **COMMON),
                                             attn_implementation="hybridrag").eval()
    assert model.config.attn_logit_softcapping == 50.0
    with pytest.raises(ValueError, match="softcapping"):
        model(make_batch("none")[0])


def test_attention_dropout_in_training_is_refused():
    eager, hybrid = build_pair("llama", attention_dropout=0.1)
    ids = make_batch("none")[0]
    with torch.no_grad():  # in eval the dropout is off, as in eager
        assert_close(hybrid(ids).logits, eager(ids).logits, atol=1e-5, what="logits")
    hybrid.train()
    with pytest.raises(ValueError, match="dropout"):
        hybrid(ids)


def test_custom_4d_mask_is_refused():
    _, model = build_pair("llama")
    ids = make_batch("none", length=8)[0]
    mask = torch.zeros(3, 1, 8, 8)
    with pytest.raises(ValueError, match="4-D"):
        model(ids, attention_mask=mask)


def test_output_attentions_match_eager():
    eager, hybrid = build_pair("mistral")
    ids, mask = make_batch("left", length=12)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask, output_attentions=True)
        actual = hybrid(ids, attention_mask=mask, output_attentions=True)
    assert len(actual.attentions) == len(expected.attentions) == 2
    valid = mask.bool()[:, None, :, None]  # rows of padding are meaningless in eager
    for got, want in zip(actual.attentions, expected.attentions):
        assert got.shape == want.shape == (3, 4, 12, 12)
        assert_close(got.masked_fill(~valid, 0), want.masked_fill(~valid, 0), atol=1e-6, what="attention weights")
    assert_close(actual.logits[mask.bool()], expected.logits[mask.bool()], atol=1e-5, what="logits")


def test_output_attentions_above_the_size_limit_is_refused(monkeypatch):
    from hybridrag.integrations import transformers as integration
    _, model = build_pair("llama")
    monkeypatch.setattr(integration, "OUTPUT_ATTENTIONS_LIMIT", 1000)
    with pytest.raises(ValueError, match="OUTPUT_ATTENTIONS_LIMIT"):
        model(make_batch("none")[0], output_attentions=True)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2-mixed"])
def test_padding_anywhere_matches_eager(name):
    # holes in the middle, right padding followed by tokens, a row of one token: any 0/1 mask runs
    eager, hybrid = build_pair(name)
    ids = make_batch("none", length=14)[0]
    mask = torch.ones_like(ids)
    mask[0, 3:6], mask[1, -4:-1], mask[2, :13] = 0, 0, 0
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).logits
        actual = hybrid(ids, attention_mask=mask).logits
    assert_close(actual[mask.bool()], expected[mask.bool()], atol=1e-5, what=f"{name} logits")


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_right_padded_generate_matches_eager(name):
    # New tokens follow the padding. Mistral's window (6) is kept longer than every run of padding: a row that sees
    # no key at all outputs zeros here, where eager averages over every key (its all-masked softmax), so rows that
    # see nothing are the one place the two legitimately differ.
    eager, hybrid = build_pair(name)
    ids, mask = make_batch("right", length=10)
    if name == "mistral":
        mask[0, :-4] = 1
        ids = ids.masked_fill(mask == 0, 0)
    args = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(hybrid.generate(ids, **args), eager.generate(ids, **args))


def _packed(lengths):
    """ids (1, sum) of several sequences packed in one row, position_ids restarting at 0 for each."""
    ids = torch.randint(3, COMMON["vocab_size"], (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_packed_sequences_equal_each_sequence_alone(name):
    # DataCollatorWithFlattening's layout: one row, position_ids restarting; logits and gradients per sequence
    _, model = build_pair(name)
    model.train()
    lengths = [9, 1, 14]
    ids, positions = _packed(lengths)
    packed = model(ids, position_ids=positions, use_cache=False).logits
    packed.float().pow(2).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = []
    for start, length in zip([0, 9, 10], lengths):
        logits = model(ids[:, start:start + length], use_cache=False).logits
        logits.float().pow(2).sum().backward()
        alone.append(logits)
    assert_close(packed, torch.cat(alone, dim=1), atol=1e-5, what="packed logits")
    for param_name, param in model.named_parameters():
        assert_close(packed_grads[param_name], param.grad, atol=1e-4, rtol=1e-4, what=f"grad of {param_name}")


def test_flash_style_cu_seq_lens_keywords_are_packed_sequences():
    _, model = build_pair("llama")
    lengths = [5, 11]
    ids, positions = _packed(lengths)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11,
                       max_length_k=11, use_cache=False).logits
        alone = torch.cat([model(ids[:, :5]).logits, model(ids[:, 5:]).logits], dim=1)
    assert_close(packed, alone, atol=1e-5, what="logits")


@pytest.mark.parametrize("name, config_kwargs, match", [
    ("llama", dict(is_causal=False), "non-causal"),  # transformers then builds a bidirectional mask
    ("gemma3-mixed", dict(use_bidirectional_attention=True), "mask pattern"),  # an or_mask_function on the causal one
])
def test_bidirectional_models_are_refused(name, config_kwargs, match):
    model = AutoModelForCausalLM.from_config(CONFIGS[name](**config_kwargs), attn_implementation="hybridrag").eval()
    with pytest.raises(ValueError, match=match):
        model(make_batch("none")[0])


def test_sinks_and_non_causal_modules_are_refused_by_the_attention_function():
    _, model = build_pair("llama")
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="sinks"):
        hybrid_attention_forward(module, q, k, k, None, scaling=0.25, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="non-causal"):
        hybrid_attention_forward(module, q, k, k, None, scaling=0.25, is_causal=False)
    out, weights = hybrid_attention_forward(module, q, k, k, None, scaling=0.25, softcap=None)
    assert out.shape == (1, 5, 4, 16) and weights is None


# ----------------------------------------------------------------------------------------------------------------
# apply_hybrid_attention


def test_apply_without_landmarks_or_memory_matches_eager():
    eager, model = build_pair("mistral")
    model.set_attn_implementation("eager")
    assert apply_hybrid_attention(model) is model
    assert model.config._attn_implementation == "hybridrag"
    ids, mask = make_batch("left")
    with torch.no_grad():
        expected, actual = eager(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    assert_close(actual[mask.bool()], expected[mask.bool()], atol=1e-5, what="logits")


def test_memory_tokens_get_gradients():
    _, model = build_pair("llama")
    apply_hybrid_attention(model, num_memory_tokens=3, landmark_stride=4, window=5)
    attention = [layer.self_attn for layer in model.model.layers]
    assert all(a.memory_k.shape == (1, 2, 3, 16) and a.memory_v.shape == (1, 2, 3, 16) for a in attention)
    model.train()
    ids, mask = make_batch("left", length=16)
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss.backward()
    for a in attention:
        for p in (a.memory_k, a.memory_v):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_apply_hybrid_cached_decoding_matches_full_forward():
    # Window, landmarks and memory tokens: decoding one token at a time against the cache gives the full forward.
    _, model = build_pair("llama")
    apply_hybrid_attention(model, num_memory_tokens=2, landmark_stride=4, window=3)
    ids = make_batch("none", length=16, batch=2)[0]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        cache = DynamicCache()
        steps = [model(ids[:, :10], past_key_values=cache, use_cache=True).logits]
        for t in range(10, 16):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, what="cached logits")


def test_landmarks_refuse_a_sliding_cache_that_dropped_keys():
    _, model = build_pair("mistral")
    apply_hybrid_attention(model, landmark_stride=4)
    ids, mask = make_batch("left", length=10)
    with pytest.raises(ValueError, match="keeps only the last"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         past_key_values=DynamicCache())
    assert out.shape == (3, 13)


@pytest.mark.parametrize("spelling", ["cache", "past_key_values"])
def test_cache_guard_reads_both_spellings_of_the_cache_argument(spelling):
    # transformers 5.24 hands attention modules `cache=`; 5.4 to 5.23 `past_key_values=`: the guard reads either.
    from hybridrag.integrations.transformers import _check_cache_keeps_keys
    _, model = build_pair("mistral")
    apply_hybrid_attention(model, landmark_stride=4)
    cache = DynamicCache(config=model.config)  # sliding layers keep the last WINDOW keys
    with torch.no_grad():
        model.model(make_batch("none", length=10)[0], **{spelling: cache}, use_cache=True)
    module = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="keeps only the last"):
        _check_cache_keeps_keys(module, (), {spelling: cache})
    _check_cache_keeps_keys(module, (), {spelling: DynamicCache()})  # a cache that keeps every key passes


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(landmark_stride=0), ValueError, "landmark_stride"),
    (dict(landmark_stride=2.0), TypeError, "landmark_stride"),
    (dict(num_memory_tokens=-1), ValueError, "num_memory_tokens"),
    (dict(window=0), ValueError, "window"),
    (dict(global_queries=1), TypeError, "global_queries"),
])
def test_apply_rejects_bad_arguments(kwargs, error, match):
    _, model = build_pair("llama")
    with pytest.raises(error, match=match):
        apply_hybrid_attention(model, **kwargs)


def test_import_hybridrag_does_not_import_transformers():
    code = "import sys, hybridrag, hybridrag.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
