"""Int8Linear and quantize_model: against nn.Linear and float models (the project's attention layers and a tiny
transformers Mistral built from a config, no downloads), gradients, state_dict, reports, and bad input. CPU path
(backend "auto"), float32 unless said otherwise.

How close is close. Symmetric int8 with one scale per channel of K Gaussian weights has a step of about
2 * amax / 255 with amax ~ 3 sigma, so a rounding noise of step / sqrt(12) ~ 0.7% of a weight's spread: about 43 dB
of signal to noise for one layer (more group-wise, a little less for W8A8, which also rounds the activations).
Tests of one layer ask for > 35 dB. Through a model, the noise of its ~15 quantized layers adds up to about 1% of the
logits' spread (measured 0.9% W8A16 and 1.3% W8A8 over 8 seeds of the Mistral below); the bound is 2.5%, which a
quantizer two bits coarser (error x4) would fail. The exact part (that the right weights were quantized and wired
in) is checked separately and tightly, against the float model carrying the dequantized weights.
"""
import copy
import io
import math

import pytest
import torch
from torch import nn

import hybridrag as hr
from hybridrag.nn import HybridAttention, Int8Linear, QuantizationReport, SlidingWindowAttention, quantize_model

MODEL_RMS_BOUND = 0.025   # RMS logit error / logit std (see the module docstring)
MODEL_MAX_BOUND = 0.10    # max logit error / logit std (a tail over thousands of logits: loose)
LAYER_SQNR_DB = 35.0


def sqnr_db(got, truth):
    got, truth = got.double(), truth.double()
    return 10 * math.log10(truth.pow(2).sum().item() / (got - truth).pow(2).sum().item())


def relative_errors(got, truth):
    """(RMS error, max error), both over the std of `truth`."""
    err, spread = (got - truth).double(), truth.double().std().item()
    return err.pow(2).mean().sqrt().item() / spread, err.abs().max().item() / spread


def gaussian_linear(in_features=256, out_features=96, bias=True, dtype=torch.float32):
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02)
        if bias:
            linear.bias.normal_(0.0, 0.02)
    return linear.to(dtype)


def dequantized_copy(quantized, original):
    """`original` (a float model) with each layer that `quantized` holds as Int8Linear given its dequantized weight:
    what a W8A16 model must compute up to float rounding."""
    twin = copy.deepcopy(original)
    for name, module in quantized.named_modules():
        if isinstance(module, Int8Linear):
            with torch.no_grad():
                twin.get_submodule(name).weight.copy_(module.qweight.dequantize())
    return twin


def expected_bytes_saved(float_model, names, group_size=None):
    """Each replaced (N, K) weight: N*K*element size -> N*K int8 + float32 scales (N, or N*K/g); bias unchanged."""
    saved = 0
    for name in names:
        n, k = float_model.get_submodule(name).weight.shape
        scales = n if group_size is None else n * k // group_size
        saved += n * k * float_model.get_submodule(name).weight.element_size() - n * k - 4 * scales
    return saved


def tensor_bytes(model):
    unique = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in unique.values())


# ----------------------------------------------------------------------------------------------------------------
# Int8Linear


@pytest.mark.parametrize("mode,group_size", [("w8a16", None), ("w8a16", 32), ("w8a8", None)])
def test_int8_linear_matches_linear(mode, group_size):
    linear = gaussian_linear()
    layer = Int8Linear.from_linear(linear, mode=mode, group_size=group_size)
    x = torch.randn(4, 7, 256)
    y = layer(x)
    assert y.shape == (4, 7, 96) and y.dtype == torch.float32
    truth = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert sqnr_db(y, truth) > LAYER_SQNR_DB
    # the layer is the op on its own weight and bias, nothing more
    expected = hr.int8_matmul(x, layer.qweight, layer.bias, activations="int8" if mode == "w8a8" else "fp",
                              backend="reference")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_group_wise_is_more_accurate_than_per_channel():
    linear = gaussian_linear()
    x = torch.randn(64, 256)
    truth = linear(x).double()
    per_channel = sqnr_db(Int8Linear.from_linear(linear)(x), truth)
    group_wise = sqnr_db(Int8Linear.from_linear(linear, group_size=32)(x), truth)
    assert group_wise > per_channel + 1.0


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_gradients_reach_input_and_bias_not_the_int8_weight(mode):
    linear = gaussian_linear(64, 48)
    layer = Int8Linear.from_linear(linear, mode=mode)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    x = torch.randn(3, 5, 64, requires_grad=True)
    grad_out = torch.randn(3, 5, 48)
    layer(x).backward(grad_out)
    # d/dx through the dequantized weight (straight through the activation rounding in W8A8), d/dbias a sum
    torch.testing.assert_close(x.grad, grad_out @ layer.qweight.dequantize(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum((0, 1)), rtol=1e-5, atol=1e-6)
    for buffer in (layer.qweight.data, layer.qweight.scale):
        assert not buffer.requires_grad and buffer.grad is None
    assert layer.qweight.data.dtype == torch.int8


def test_frozen_bias_stays_frozen_and_without_bias_only_x_gets_a_gradient():
    linear = gaussian_linear(32, 16)
    linear.bias.requires_grad_(False)
    assert not Int8Linear.from_linear(linear).bias.requires_grad
    layer = Int8Linear.from_linear(gaussian_linear(32, 16, bias=False))
    assert layer.bias is None and list(layer.parameters()) == []
    x = torch.randn(2, 32, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == (2, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_from_linear_keeps_dtype_device_and_copies_bias(dtype):
    linear = gaussian_linear(64, 32, dtype=dtype)
    before = linear.weight.detach().clone()
    layer = Int8Linear.from_linear(linear)
    assert layer.dtype == dtype and layer.bias.dtype == dtype
    assert layer.qweight.data.dtype == torch.int8 and layer.qweight.scale.dtype == torch.float32
    assert layer.qweight.data.device == linear.weight.device == layer.bias.device
    assert layer.bias.data_ptr() != linear.bias.data_ptr()
    torch.testing.assert_close(layer.bias, linear.bias, rtol=0, atol=0)
    assert torch.equal(linear.weight, before)  # the float layer is left alone
    x = torch.randn(5, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert sqnr_db(y, nn.functional.linear(x.double(), before.double(), linear.bias.double())) > 30.0


@pytest.mark.parametrize("group_size", [None, 16])
def test_state_dict_round_trip(group_size):
    layer = Int8Linear.from_linear(gaussian_linear(64, 32), group_size=group_size)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"bias", "qweight.data", "qweight.scale", "qweight._extra_state"}
    fresh = Int8Linear(64, 32, group_size=group_size)
    assert not torch.equal(fresh.qweight.data, layer.qweight.data)
    fresh.load_state_dict(state)
    assert fresh.group_size == group_size
    for name, tensor in layer.state_dict().items():
        if name.endswith("_extra_state"):
            assert fresh.state_dict()[name] == tensor
        else:
            assert torch.equal(fresh.state_dict()[name], tensor) and fresh.state_dict()[name].dtype == tensor.dtype
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_into_a_layer_of_another_grouping_is_refused():
    state = Int8Linear.from_linear(gaussian_linear(64, 32), group_size=16).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for qweight.scale"):
        Int8Linear(64, 32).load_state_dict(state)


def test_extra_repr():
    text = repr(Int8Linear.from_linear(gaussian_linear(64, 32), group_size=16))
    assert "in_features=64, out_features=32, bias=True, mode='w8a16', group_size=16" in text
    text = repr(Int8Linear(64, 32, bias=False, mode="w8a8", dtype=torch.float16))
    assert "in_features=64, out_features=32, bias=False, mode='w8a8', per channel, dtype=torch.float16" in text


def test_constructor_makes_a_usable_layer_like_nn_linear():
    layer = Int8Linear(128, 40)
    y = layer(torch.randn(6, 128))
    assert y.shape == (6, 40) and torch.isfinite(y).all()
    bound = 1 / math.sqrt(128)  # nn.Linear's init: |w| and |b| below 1 / sqrt(in_features)
    assert layer.qweight.dequantize().abs().max() <= bound * (1 + 1e-6)
    assert layer.bias.abs().max() <= bound
    assert layer.qweight.data.abs().max() == 127


def test_input_dtype_must_match_outside_autocast_and_is_cast_under_it():
    layer = Int8Linear.from_linear(gaussian_linear(64, 32))
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match="x has dtype torch.float16 but this Int8Linear computes in torch.float32"):
        layer(x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.float32  # the layer's compute dtype, not autocast's
    torch.testing.assert_close(y, layer(x.bfloat16().float()), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_to_dtype_changes_compute_dtype_but_not_int8_weight_or_scales(bias):
    layer = Int8Linear.from_linear(gaussian_linear(64, 32, bias=bias))
    data, scale = layer.qweight.data.clone(), layer.qweight.scale.clone()
    layer.half()
    assert layer.dtype == torch.float16 and (not bias or layer.bias.dtype == torch.float16)
    assert torch.equal(layer.qweight.data, data) and torch.equal(layer.qweight.scale, scale)
    assert layer.qweight.scale.dtype == torch.float32
    assert layer(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16
    layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and torch.equal(layer.qweight.scale, scale)


def test_int8_linear_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        Int8Linear(64, 32, mode="w4a16")
    with pytest.raises(ValueError, match="mode='w8a8' needs a per-channel weight"):
        Int8Linear(64, 32, mode="w8a8", group_size=16)
    with pytest.raises(ValueError, match=r"group_size \(48\) must divide in_features \(64\)"):
        Int8Linear(64, 32, group_size=48)
    with pytest.raises(TypeError, match="group_size must be an int"):
        Int8Linear(64, 32, group_size=16.0)
    with pytest.raises(ValueError, match="in_features must be positive"):
        Int8Linear(0, 32)
    with pytest.raises(TypeError, match="dtype must be one of"):
        Int8Linear(64, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend must be one of"):
        Int8Linear(64, 32, backend="cuda")
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        Int8Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="linear's weight dtype must be one of"):
        Int8Linear.from_linear(nn.Linear(8, 8).double())
    with pytest.raises(ValueError, match=r"group_size \(48\) must divide in_features \(64\)"):
        Int8Linear.from_linear(nn.Linear(64, 8), group_size=48)
    layer = Int8Linear(64, 32)
    with pytest.raises(ValueError, match="x must have last dim 64"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([1.0] * 64)


@pytest.mark.parametrize("cache, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float16), ("fp32", torch.float32)])
def test_cpu_cache_layer_matches_uncached_and_trains(cache, dtype):
    """cpu_cache computes what the uncached layer computes (up to float rounding: both are within the tolerance rule
    of the reference, tests/test_int8_ops.py), keeps gradients to x and bias, and stays out of the state_dict."""
    linear = gaussian_linear(64, 48, dtype=dtype)
    plain = Int8Linear.from_linear(linear)
    cached = Int8Linear.from_linear(linear, cpu_cache=cache)
    assert cached.cpu_cache == cache and f"cpu_cache={cache!r}" in repr(cached)
    assert cached.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    cached(x).sum().backward()
    assert x.grad is not None and cached.bias.grad is not None
    bound = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-6}[dtype]  # relative, in norm

    def close(got, want):
        return ((got.double() - want.double()).norm() / want.double().norm()).item() <= bound
    with torch.no_grad():
        assert close(cached(x), plain(x))
        assert cached.qweight.cached_dense().shape == (48, 64)
        cached.load_state_dict(Int8Linear.from_linear(gaussian_linear(64, 48, dtype=dtype)).state_dict())
        assert not close(cached(x), plain(x))  # the cache followed the loaded weights ...
        plain.load_state_dict(cached.state_dict())
        assert close(cached(x), plain(x))  # ... to the same layer


def test_cpu_cache_bad_arguments():
    with pytest.raises(ValueError, match="cpu_cache must be one of"):
        Int8Linear(64, 32, cpu_cache="fp16")
    with pytest.raises(ValueError, match="cpu_cache keeps a dequantized weight for mode='w8a16'"):
        Int8Linear(64, 32, mode="w8a8", cpu_cache="fp32")
    with pytest.raises(ValueError, match="cpu_cache='bf16' needs a bfloat16 layer"):
        Int8Linear.from_linear(nn.Linear(64, 32), cpu_cache="bf16")
    layer = Int8Linear(64, 32, cpu_cache="bf16", dtype=torch.bfloat16).half()  # a later dtype change
    with pytest.raises(TypeError, match="cpu_cache='bf16' takes bfloat16 x"):
        layer(torch.randn(2, 64).half())
    with pytest.raises(ValueError, match="cpu_cache must be one of"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), cpu_cache=True)


@pytest.mark.parametrize("dtype, cpu_cache, routes", [
    (torch.bfloat16, None, {1: "int8pack", 8: "int8pack", 16: "bf16"}),
    (torch.float16, None, {1: "fp32", 16: "fp32"}),
    (torch.float32, None, {1: "fp32", 16: "fp32"}),
    (torch.bfloat16, "bf16", {1: "int8pack", 16: "cached"}),
    (torch.float32, "fp32", {1: "cached", 16: "cached"}),
], ids=str)
def test_quantize_model_takes_the_intended_cpu_route_per_dtype(dtype, cpu_cache, routes, monkeypatch, cpu_kernels):
    """Which W8A16 route a quantize_model'd model's layers take on CPU, by dtype and M (kernels/int8/cpu.py; chosen
    by rule, not by timing): the C++ kernel for decode sizes where it is in use, else _weight_int8pack_mm for
    bfloat16 ones; widened bfloat16 above, float32 for float16 and float32, the dense cache when asked for (but not
    where the C++ kernel or _weight_int8pack_mm is faster)."""
    from hybridrag.kernels.int8 import cpu
    if cpu_kernels == "cpp":
        routes = {m: "cpp" if m <= cpu.SMALL_M else route for m, route in routes.items()}
    seen = []
    real = cpu.w8a16_route
    monkeypatch.setattr(cpu, "w8a16_route", lambda *args: seen.append(real(*args)) or seen[-1])
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)).to(dtype)
    quantize_model(model, cpu_cache=cpu_cache)
    for m, route in routes.items():
        seen.clear()
        with torch.no_grad():
            model(torch.randn(m, 64, dtype=dtype))
        assert seen == ([] if route == "cached" else [route, route]), (m, seen)
    assert (model[0].qweight._dense is not None) == (cpu_cache is not None)


def test_quantize_model_cpu_cache_reports_its_bytes_and_skips_what_it_cannot_serve():
    model = nn.Sequential(nn.Linear(64, 32).bfloat16(), nn.Linear(32, 16))
    report = quantize_model(model, cpu_cache="bf16")
    assert report.replaced == ["0"] and "cpu_cache='bf16' needs a bfloat16 layer" in report.skipped["1"]
    assert model[0].cpu_cache == "bf16" and report.cpu_cache_bytes == 64 * 32 * 2
    assert "cpu_cache='bf16': 4,096 more bytes once built" in str(report)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    report = quantize_model(model, cpu_cache="fp32", group_size=16)
    assert report.cpu_cache_bytes == (64 * 32 + 32 * 16) * 4 and model[1].cpu_cache == "fp32"
    assert quantize_model(nn.Sequential(nn.Linear(8, 8))).cpu_cache_bytes == 0


# ----------------------------------------------------------------------------------------------------------------
# quantize_model on the project's own layers


def attention_stack():
    return nn.Sequential(
        HybridAttention(64, 4, num_kv_heads=2, window=8, landmark_stride=5, num_memory_tokens=2, bias=True),
        nn.LayerNorm(64),
        SlidingWindowAttention(64, 4, window=6, num_kv_heads=2),
        nn.Linear(64, 64),
    ).eval()


def test_quantize_model_on_hybridrag_layers():
    model = attention_stack()
    original = copy.deepcopy(model)
    x = torch.randn(2, 24, 64)
    report = quantize_model(model)
    projections = [f"{i}.{p}_proj" for i in (0, 2) for p in "qkvo"]
    assert report.replaced == projections + ["3"] and report.skipped == {}
    assert all(isinstance(model.get_submodule(name), Int8Linear) for name in report.replaced)
    assert isinstance(model[1], nn.LayerNorm) and model[0].memory_k is not None
    with torch.no_grad():
        got, truth = model(x), original(x)
        exact = dequantized_copy(model, original)(x)
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-5)
    rms, worst = relative_errors(got, truth)
    assert rms < MODEL_RMS_BOUND and worst < MODEL_MAX_BOUND, (rms, worst)
    assert report.bytes_saved == expected_bytes_saved(original, report.replaced) > 0
    assert report.bytes_before == tensor_bytes(original) and report.bytes_after == tensor_bytes(model)


def test_quantized_layers_train_their_float_parts():
    model = attention_stack().train()
    quantize_model(model, group_size=16)
    x = torch.randn(2, 12, 64, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and model[0].memory_k.grad is not None and model[0].q_proj.bias.grad is not None
    assert all(t.grad is None for name, t in model.named_buffers() if name.endswith(("qweight.data", "scale")))


def test_module_registered_twice_becomes_one_int8_linear():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = quantize_model(model)
    assert report.replaced == ["0", "2"]
    assert isinstance(model[0], Int8Linear) and model[0] is model[2]
    assert report.bytes_saved == 32 * 32 * 3 - 4 * 32  # counted once


def test_subclasses_of_linear_are_skipped_with_a_reason():
    model = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 32))
    report = quantize_model(model)
    assert report.replaced == ["1"]
    assert "subclass of nn.Linear (NonDynamicallyQuantizableLinear)" in report.skipped["0.out_proj"]
    x = torch.randn(2, 5, 32)
    model[1](model[0](x, x, x)[0])  # still runs: its out_proj kept its float .weight


def test_quantize_model_bad_arguments():
    model = attention_stack()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_model(lambda x: x)
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize_model(model, mode="int4")
    with pytest.raises(ValueError, match="mode='w8a8' needs a per-channel weight"):
        quantize_model(model, mode="w8a8", group_size=32)
    with pytest.raises(ValueError, match="group_size must be positive"):
        quantize_model(model, group_size=0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        quantize_model(model, group_size="32")
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_model(model, backend="gpu")
    with pytest.raises(TypeError, match="skip must be a collection"):
        quantize_model(model, skip=3)
    with pytest.raises(TypeError, match="skip patterns must be str"):
        quantize_model(model, skip=["0.q_proj", 2])
    # nothing was changed by the refused calls
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# quantize_model on a tiny transformers Mistral

MISTRAL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128,
               sliding_window=6)
LINEARS_PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALL_LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in LINEARS_PER_LAYER] + ["lm_head"]


@pytest.fixture(scope="module")
def transformers_mistral():
    transformers = pytest.importorskip("transformers", minversion="5.4")

    def build(**config):
        torch.manual_seed(1)
        config = transformers.MistralConfig(**{**MISTRAL, **config})
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return build


def token_ids(batch=2, length=16):
    return torch.randint(3, MISTRAL["vocab_size"], (batch, length))


@pytest.mark.parametrize("mode,group_size", [("w8a16", None), ("w8a16", 32), ("w8a8", None)])
def test_mistral_logits_close_to_float(transformers_mistral, mode, group_size):
    model = transformers_mistral()
    original = copy.deepcopy(model)
    ids = token_ids()
    report = quantize_model(model, mode=mode, group_size=group_size)
    assert report.replaced == ALL_LINEARS and report.skipped == {}
    with torch.no_grad():
        got, truth = model(ids).logits, original(ids).logits
        if mode == "w8a16":
            torch.testing.assert_close(got, dequantized_copy(model, original)(ids).logits, rtol=1e-4, atol=1e-5)
    rms, worst = relative_errors(got, truth)
    assert rms < MODEL_RMS_BOUND and worst < MODEL_MAX_BOUND, (rms, worst)
    assert report.bytes_saved == expected_bytes_saved(original, report.replaced, group_size) > 0
    assert report.bytes_before == tensor_bytes(original) and report.bytes_after == tensor_bytes(model)


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_mistral_generate_with_cache_matches_stepwise_greedy(transformers_mistral, mode):
    model = transformers_mistral()
    quantize_model(model, mode=mode, skip=("lm_head",))
    ids = token_ids(batch=1, length=8)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 12)
    expected = ids  # the same greedy decode, recomputing the whole sequence at each step (no cache)
    with torch.no_grad():
        for _ in range(4):
            next_token = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)


def test_mistral_state_dict_round_trip(transformers_mistral):
    saved = transformers_mistral()
    quantize_model(saved, group_size=32, skip=("lm_head",))
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    fresh = transformers_mistral()
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(torch.randn_like(param))
    quantize_model(fresh, group_size=32, skip=("lm_head",))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, saved(ids).logits)


def test_mistral_skip_patterns_and_callable(transformers_mistral):
    model = transformers_mistral()
    report = quantize_model(model, skip=("lm_head", "model.layers.0", "*.mlp.down_proj", "lm-head"))
    assert report.replaced == [f"model.layers.1.{p}" for p in LINEARS_PER_LAYER[:-1]]
    assert report.skipped["lm_head"] == "matches skip pattern 'lm_head'"
    assert report.skipped["model.layers.0.self_attn.q_proj"] == (
        "inside 'model.layers.0', which matches skip pattern 'model.layers.0'")
    assert report.skipped["model.layers.1.mlp.down_proj"] == "matches skip pattern '*.mlp.down_proj'"
    assert set(report.replaced) | set(report.skipped) == set(ALL_LINEARS)
    assert report.unmatched_skip == ["lm-head"]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)

    model = transformers_mistral()
    report = quantize_model(model, skip=lambda name, module: module.out_features == MISTRAL["vocab_size"])
    assert report.skipped == {"lm_head": "skip('lm_head', module) returned True"}
    assert report.replaced == ALL_LINEARS[:-1]


def test_mistral_tied_lm_head_is_skipped_with_a_reason(transformers_mistral):
    model = transformers_mistral(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    original = copy.deepcopy(model)
    report = quantize_model(model)
    assert report.skipped == {"lm_head": "weight is shared with model.embed_tokens.weight (tied weights)"}
    assert report.replaced == ALL_LINEARS[:-1]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert report.bytes_saved == expected_bytes_saved(original, report.replaced)
    ids = token_ids()
    with torch.no_grad():
        rms, worst = relative_errors(model(ids).logits, original(ids).logits)
    assert rms < MODEL_RMS_BOUND and worst < MODEL_MAX_BOUND, (rms, worst)
    assert model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 18)


def test_mistral_group_size_that_does_not_divide_is_reported(transformers_mistral):
    model = transformers_mistral()
    original = copy.deepcopy(model)
    report = quantize_model(model, group_size=128)  # divides down_proj's 128 inputs, not the others' 64
    assert report.replaced == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert set(report.skipped) == set(ALL_LINEARS) - set(report.replaced)
    assert set(report.skipped.values()) == {"group_size 128 does not divide in_features 64"}
    assert report.bytes_saved == expected_bytes_saved(original, report.replaced, 128)
    text = str(report)
    assert "replaced 2 nn.Linear layer(s), skipped 13" in text
    assert "lm_head: group_size 128 does not divide in_features 64" in text
    with torch.no_grad():
        model(token_ids())


def test_report_str(transformers_mistral):
    model = transformers_mistral(tie_word_embeddings=True)
    report = quantize_model(model, skip=["nothing.here"])
    assert isinstance(report, QuantizationReport)
    text = str(report)
    assert text.startswith("quantize_model (w8a16, per channel): replaced 14 nn.Linear layer(s), skipped 1")
    assert f"{report.bytes_before:,} -> {report.bytes_after:,} bytes (saved {report.bytes_saved:,}" in text
    assert "lm_head: weight is shared with model.embed_tokens.weight (tied weights)" in text
    assert "skip patterns that matched no module: 'nothing.here'" in text
