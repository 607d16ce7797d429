"""hybridrag.encoders: HybridEncoder shapes for every attention kind and fusion, padding invariance, gradients, the
convolutional block's masking, encode with the real all-MiniLM-L6-v2 tokenizer, int8, save/load, and bad input.

Tiny configs (hidden 32, 2 layers, T <= 64) on one thread: the whole file runs in seconds on a busy CPU."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from hybridrag.encoders import HybridEncoder, HybridEncoderConfig, MultiScaleConv, QuantizationConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, window_size=4,
            output_dim=24, max_length=64, dropout=0.0)
KINDS = [dict(attention="window"), dict(attention="hybrid"), dict(attention="hybrid", landmark_stride=8)]
FUSIONS = ("concat", "weighted", "attention")
TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog, twice: the quick brown fox.", "a",
         "retrieval-augmented generation over long contexts", "sliding windows, landmarks and int8 weights"]


def tiny(**changes):
    return HybridEncoder({**TINY, **changes}).eval()


def batch(lengths, total, vocab=101, seed=0):
    """Right-padded random ids (B, total) and the mask of the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), total), generator=generator)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return ids, mask


@pytest.fixture(scope="module")
def text_encoder():
    """A tiny encoder over the bundled all-MiniLM-L6-v2 tokenizer (vocabulary 30522)."""
    torch.manual_seed(0)
    encoder = HybridEncoder({**TINY, "vocab_size": 30522}).eval()
    encoder.tokenizer  # load once for the module
    return encoder


# ---------------------------------------------------------------- shapes and padding

@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: "-".join(map(str, kind.values())))
def test_output_shapes_for_every_attention_kind_and_fusion(kind, fusion):
    encoder = tiny(fusion=fusion, **kind)
    ids, mask = batch([37, 20, 5], 37)
    out = encoder(ids, mask)
    assert out["hidden"].shape == (3, 37, 24) and out["pooled"].shape == (3, 24)
    assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], mask)
    assert torch.isfinite(out["hidden"]).all()
    assert (out["hidden"][~mask] == 0).all()  # padding rows are zero
    assert torch.allclose(out["pooled"][1], out["hidden"][1, :20].mean(0), atol=1e-6)
    assert encoder(ids[:1]).keys() == out.keys()  # attention_mask=None: every token real


@pytest.mark.parametrize("pooling", ("mean", "cls"))
@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: "-".join(map(str, kind.values())))
def test_a_text_alone_equals_the_same_text_in_a_padded_batch(kind, pooling):
    encoder = tiny(pooling=pooling, fusion="attention", **kind)
    ids, mask = batch([45, 19, 33], 45)
    together = encoder(ids, mask)
    for row, length in enumerate((45, 19, 33)):
        alone = encoder(ids[row:row + 1, :length])
        assert (together["pooled"][row] - alone["pooled"][0]).abs().max() < 1e-5
        assert (together["hidden"][row, :length] - alone["hidden"][0]).abs().max() < 1e-5


def test_padding_ids_change_nothing():
    encoder = tiny(attention="hybrid", landmark_stride=8)
    ids, mask = batch([30, 12], 30)
    other = ids.clone()
    other[~mask] = (other[~mask] + 7) % 101
    assert torch.equal(encoder(ids, mask)["hidden"], encoder(other, mask)["hidden"])


def test_attention_is_bidirectional_within_the_band():
    """With one layer of window attention (w = 4) and no convolution reach beyond 3, a change at position 20 moves
    earlier tokens within the reach of both (the attention looks forward too) and leaves far-away tokens alone."""
    encoder = tiny(attention="window", num_layers=1, conv_kernel_sizes=(3,))
    ids, _ = batch([40], 40)
    changed = ids.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 101
    moved = (encoder(ids)["hidden"] - encoder(changed)["hidden"]).abs().amax(-1)[0] > 0
    # conv reach 1, attention reach 4: positions 15..25 can change; 14 and before, 26 and after cannot
    assert moved[16] and moved[19] and moved[20] and moved[24]
    assert not moved[:15].any() and not moved[26:].any()


@pytest.mark.parametrize("kind", KINDS[:2], ids=("window", "hybrid"))
def test_the_kernels_match_the_reference_backend(kind):
    encoder = tiny(**kind)
    reference = HybridEncoder({**TINY, **kind}, backend="reference").eval()
    reference.load_state_dict(encoder.state_dict())
    ids, mask = batch([50, 23], 50)
    assert torch.allclose(encoder(ids, mask)["hidden"], reference(ids, mask)["hidden"], atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("attention", ("window", "hybrid"))
def test_gradients_reach_every_parameter(attention, fusion):
    encoder = tiny(attention=attention, fusion=fusion, pooling="mean").train()
    ids, mask = batch([24, 9], 24)
    out = encoder(ids, mask)
    (out["pooled"].square().sum() + out["hidden"].sum()).backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_the_conv_block_does_not_leak_across_padding():
    conv = MultiScaleConv(16, (3, 5, 7))
    x = torch.randn(1, 10, 16)
    padded = torch.cat((x, 1e3 * torch.randn(1, 6, 16)), dim=1)  # loud values where padding sits
    mask = torch.arange(16)[None] < 10
    out = conv(padded, mask)
    assert torch.allclose(out[:, :10], conv(x, torch.ones(1, 10, dtype=torch.bool)), atol=1e-5)
    assert (out[:, 10:] == 0).all()


# ---------------------------------------------------------------- text

def test_encode_batches_give_the_vectors_of_one_by_one(text_encoder):
    together = text_encoder.encode(TEXTS, batch_size=2)
    assert together.shape == (5, 24) and together.dtype == np.float32
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.stack([text_encoder.encode(text) for text in TEXTS])  # a lone str gives (d,)
    assert np.abs(together - alone).max() < 1e-5
    raw = text_encoder.encode(TEXTS[:2], normalize=False, progress=True)  # a tqdm bar on stderr
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_encode_token_states_come_with_their_mask(text_encoder):
    states, mask = text_encoder.encode(TEXTS, return_pooled=False, batch_size=3)
    lengths = [len(text_encoder.tokenizer(text)["input_ids"]) for text in TEXTS]
    assert states.shape == (5, max(lengths), 24) and mask.shape == (5, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert (states[~mask] == 0).all() and np.allclose(np.linalg.norm(states[mask], axis=-1), 1.0, atol=1e-5)


def test_long_texts_are_truncated_with_one_warning_or_refused(text_encoder):
    long = "word " * 200
    with pytest.warns(UserWarning, match=r"2 of 3 texts were longer than max_length=64 tokens") as caught:
        vectors = text_encoder.encode([long, "short", long + "tail"])
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.allclose(vectors[0], text_encoder.encode(" ".join(long.split()[:62])), atol=1e-5)
    with pytest.raises(ValueError, match=r"1 of 2 texts are longer than max_length=64 tokens \(texts 1\)"):
        text_encoder.encode(["short", long], truncate=False)


@pytest.mark.parametrize("texts, error, match", [
    ([], ValueError, r"texts is empty"),
    (["fine", 3, "also"], TypeError, r"texts\[1\] must be a str, got int"),
    (b"bytes", TypeError, r"texts must be a str or a list of str, got bytes"),
    (None, TypeError, r"texts must be a str or a list of str, got NoneType"),
])
def test_encode_refuses_bad_texts(text_encoder, texts, error, match):
    with pytest.raises(error, match=match):
        text_encoder.encode(texts)


def test_encode_refuses_bad_options(text_encoder):
    with pytest.raises(ValueError, match=r"batch_size must be an int > 0, got 0"):
        text_encoder.encode(["a"], batch_size=0)
    with pytest.raises(TypeError, match=r"progress must be True, False or None, got 'yes'"):
        text_encoder.encode(["a"], progress="yes")


def test_forward_refuses_bad_inputs():
    encoder = tiny()
    ids, mask = batch([10, 6], 10)
    gap = mask.clone()
    gap[1, 8] = True
    with pytest.raises(ValueError, match=r"attention_mask row 1 is not right-padded"):
        encoder(ids, gap)
    with pytest.raises(ValueError, match=r"attention_mask row 0 has no real token"):
        encoder(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=101\), got values in \[101, 101\]"):
        encoder(torch.full((1, 4), 101))
    with pytest.raises(ValueError, match=r"65 tokens per row, more than max_length=64"):
        encoder(torch.zeros((1, 65), dtype=torch.long))
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor, got dtype torch.float32"):
        encoder(torch.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 10\), got \(2, 9\)"):
        encoder(ids, mask[:, :9])


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("field, value, match", [
    ("hidden_size", 0, r"hidden_size must be an int > 0, got 0"),
    ("num_layers", 1.5, r"num_layers must be an int > 0, got 1.5"),
    ("num_heads", 3, r"num_heads \(3\) must divide hidden_size \(32\)"),
    ("num_heads", 4, r"head dim\) must be even and in \[16, 256\].*32 / 4 = 8"),
    ("conv_kernel_sizes", (3, 4), r"conv_kernel_sizes must be a non-empty list of distinct odd ints"),
    ("conv_kernel_sizes", [], r"conv_kernel_sizes must be a non-empty list"),
    ("attention", "full", r"attention must be one of 'window', 'hybrid', got 'full'"),
    ("window_size", 0, r"window_size must be an int >= 1 or -1"),
    ("fusion", "sum", r"fusion must be one of 'concat', 'weighted', 'attention', got 'sum'"),
    ("pooling", "max", r"pooling must be one of 'mean', 'cls', got 'max'"),
    ("dropout", 1.0, r"dropout must be a number in \[0, 1\), got 1.0"),
    ("max_length", True, r"max_length must be an int > 0, got True"),
    ("tokenizer", 5, r"tokenizer must be None .* or a path"),
])
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        HybridEncoderConfig(**{**TINY, field: value})


def test_config_landmark_rules():
    assert HybridEncoderConfig(**TINY, attention="window").num_landmark_tokens == 0
    assert HybridEncoderConfig(**TINY, attention="hybrid").num_landmark_tokens == 1
    with pytest.raises(ValueError, match=r"attention='window' has no landmarks.*landmark_stride=8"):
        HybridEncoderConfig(**TINY, attention="window", landmark_stride=8)
    with pytest.raises(ValueError, match=r"attention='hybrid' needs landmarks"):
        HybridEncoderConfig(**TINY, attention="hybrid", num_landmark_tokens=0)


def test_config_loads_from_dict_json_and_yaml_and_refuses_unknown_keys(tmp_path):
    config = HybridEncoderConfig(**TINY, fusion="weighted", conv_kernel_sizes=(1, 3))
    (tmp_path / "encoder.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "encoder.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.to_dict().items()))
    assert HybridEncoderConfig.from_any(tmp_path / "encoder.json") == config
    assert HybridEncoderConfig.from_any(str(tmp_path / "encoder.yaml")) == config
    assert HybridEncoderConfig.from_any(config) is config
    assert HybridEncoderConfig.from_any(None) == HybridEncoderConfig()
    with pytest.raises(ValueError, match=r"unknown keys \['hiden_size'\]"):
        HybridEncoderConfig.from_any({"hiden_size": 32})
    with pytest.raises(ValueError, match=r"unknown keys \['bits'\]"):
        QuantizationConfig.from_any({"mode": "w8a8", "bits": 8})


@pytest.mark.parametrize("values, match", [
    (dict(mode="int4"), r"mode must be one of None, 'w8a16', 'w8a8', got 'int4'"),
    (dict(mode="w8a8", group_size=16), r"group_size is for mode='w8a16'"),
    (dict(group_size=0), r"group_size must be an int > 0, got 0"),
    (dict(calibration_batches=0), r"calibration_batches must be an int > 0, got 0"),
])
def test_quantization_config_errors_name_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        QuantizationConfig(**values)


# ---------------------------------------------------------------- int8

@pytest.mark.parametrize("quantization", [dict(mode="w8a16"), dict(mode="w8a16", group_size=16), dict(mode="w8a8")],
                         ids=("w8a16", "w8a16-g16", "w8a8"))
def test_quantized_encoder_stays_close_to_float_and_is_smaller(quantization):
    encoder = tiny(vocab_size=33)  # a small embedding, so the int8 blocks dominate size_bytes
    ids, mask = batch([40, 17, 29], 40, vocab=33)
    before, size, count = encoder(ids, mask)["pooled"], encoder.size_bytes(), encoder.num_parameters()
    result = encoder.quantize(quantization)
    assert len(result["report"].replaced) == 12 and result["agreement"] is None  # 2 blocks x (q, k, v, o, up, down)
    after = encoder(ids, mask)["pooled"]
    assert torch.nn.functional.cosine_similarity(before, after, dim=-1).min() > 0.99
    assert encoder.size_bytes() < 0.75 * size and encoder.num_parameters() == count
    with pytest.raises(ValueError, match=r"already quantized"):
        encoder.quantize(quantization)


def test_quantize_reports_agreement_on_calibration_texts(text_encoder):
    encoder = HybridEncoder(text_encoder.config).eval()
    encoder.load_state_dict(text_encoder.state_dict())
    encoder._tokenizer = text_encoder.tokenizer
    result = encoder.quantize({"mode": "w8a8", "calibration_batches": 1}, calibration_texts=TEXTS)
    assert result["agreement"]["texts"] == 5 and result["agreement"]["min_cosine"] > 0.99
    with pytest.raises(ValueError, match=r"calibration_texts is empty"):
        HybridEncoder(TINY).quantize({"mode": "w8a8"}, calibration_texts=[])


def test_quantize_refuses_a_group_size_that_does_not_divide():
    encoder = tiny()
    with pytest.raises(ValueError, match=r"group_size \(24\) must divide hidden_size \(32\)"):
        encoder.quantize({"group_size": 24})
    assert encoder.quantization is None and encoder.quantize({"mode": None}) == {"report": None, "agreement": None}


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("quantization", [None, dict(mode="w8a8")], ids=("float", "w8a8"))
def test_save_and_load_round_trip(tmp_path, quantization):
    encoder = tiny(attention="hybrid", landmark_stride=8, fusion="attention")
    if quantization:
        encoder.quantize(quantization)
    path = encoder.save(tmp_path / "encoder.pt")
    loaded = HybridEncoder.load(path, config=encoder.config).eval()
    assert loaded.config == encoder.config and loaded.quantization == encoder.quantization
    for (name, a), (other, b) in zip(encoder.state_dict().items(), loaded.state_dict().items()):
        assert name == other and (not isinstance(a, torch.Tensor) or torch.equal(a, b)), name
    ids, mask = batch([30, 11], 30)
    assert torch.equal(encoder(ids, mask)["pooled"], loaded(ids, mask)["pooled"])


def test_loading_into_another_config_names_the_fields(tmp_path):
    path = tiny().save(tmp_path / "encoder.pt")
    with pytest.raises(ValueError, match=r"2 field\(s\) differ: hidden_size: 32 in the checkpoint, 64 in the given "
                                         r"config; num_layers: 2 in the checkpoint, 3"):
        HybridEncoder.load(path, config={**TINY, "hidden_size": 64, "num_layers": 3})


def test_corrupt_truncated_foreign_and_missing_files_are_clear_errors(tmp_path):
    path = tiny().save(tmp_path / "encoder.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    (tmp_path / "short.pt").write_bytes(path.read_bytes()[:-100])
    torch.save({"weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"flipped.pt is corrupt: .* \(truncated or altered\)"):
        HybridEncoder.load(tmp_path / "flipped.pt")
    with pytest.raises(ValueError, match=r"short.pt is corrupt"):
        HybridEncoder.load(tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"foreign.pt is not a HybridEncoder checkpoint"):
        HybridEncoder.load(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match=r"no HybridEncoder checkpoint at"):
        HybridEncoder.load(tmp_path / "absent.pt")


def test_importing_the_encoders_pulls_in_neither_the_system_stack_nor_the_server():
    code = ("import sys, hybridrag.encoders; print(sorted(m for m in sys.modules if m.startswith(('hybridrag.system.', "
            "'hybridrag.server', 'hybridrag.train', 'transformers'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
