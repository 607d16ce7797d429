"""Drop-in layers: SlidingWindowAttention and RotaryEmbedding against plain PyTorch and transformers."""
import os

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_tolerance

from hybridrag.nn import RotaryEmbedding, SlidingWindowAttention
from hybridrag.nn.rotary import rotate_half

HAS_CUDA = torch.cuda.is_available()
CAN_RUN_TRITON = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------------
# a straightforward implementation to hold the layer against: dense mask, softmax, repeat_interleave for GQA


def naive_rope(x, position_ids, base):
    """x (B, h, T, D), position_ids (B, T) or (T,) -> rotate-half RoPE in float64."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids.to(torch.float64)[..., None] * inv_freq  # (B, T, D/2) or (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    if emb.dim() == 3:
        emb = emb[:, None]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def band(window, causal):
    """(left, right) of the layer's window, -1 unbounded, in the flash-attn meaning."""
    if isinstance(window, int):
        left, right = (-1 if window == -1 else window - 1), 0
    else:
        left, right = window
    return left, (0 if causal else right)


def naive_layer(layer, x, position_ids=None):
    """The layer's forward written out plainly in float64 with the layer's own weights."""
    x = x.double()
    batch, length, _ = x.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def proj(linear, h):
        bias = None if linear.bias is None else linear.bias.double()
        return F.linear(x, linear.weight.double(), bias).view(batch, length, h, dim).transpose(1, 2)

    q, k, v = proj(layer.q_proj, heads), proj(layer.k_proj, kv_heads), proj(layer.v_proj, kv_heads)
    if layer.rotary is not None:
        pos = torch.arange(length) if position_ids is None else position_ids
        q, k = naive_rope(q, pos, layer.rotary.base), naive_rope(k, pos, layer.rotary.base)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    left, right = band(layer.window, layer.causal)
    p = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    visible = torch.ones(length, length, dtype=torch.bool)
    if left != -1:
        visible &= j >= p - left
    if right != -1:
        visible &= j <= p + right
    scores = (q @ k.transpose(-1, -2)) * dim ** -0.5
    o = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v
    o = o.transpose(1, 2).reshape(batch, length, heads * dim)
    bias = None if layer.o_proj.bias is None else layer.o_proj.bias.double()
    return F.linear(o, layer.o_proj.weight.double(), bias)


def make_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = {"hidden_size": 64, "num_heads": 4, "window": 4}
    config.update(kwargs)
    return SlidingWindowAttention(**config)


# ----------------------------------------------------------------------------------------------------------------
# SlidingWindowAttention


@pytest.mark.parametrize("length", [1, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shape_and_dtype(length, dtype):
    layer = make_layer(num_kv_heads=2, dtype=dtype)
    x = torch.randn(2, length, 64, dtype=dtype)
    out = layer(x)
    assert out.shape == (2, length, 64)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("window", [1, 4, (-1, 0), (2, 3)], ids=["w1", "w4", "full_causal", "band_clipped"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_matches_naive(window, num_kv_heads):
    layer = make_layer(window=window, num_kv_heads=num_kv_heads, bias=True)
    x = torch.randn(2, 13, 64)
    torch.testing.assert_close(layer(x), naive_layer(layer, x).float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [(2, 3), (-1, 1), (0, -1)], ids=["band", "left_unbounded", "right_unbounded"])
def test_bidirectional_matches_naive(window):
    layer = make_layer(window=window, num_kv_heads=2, causal=False)
    x = torch.randn(2, 13, 64)
    torch.testing.assert_close(layer(x), naive_layer(layer, x).float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window, causal", [(4, True), ((2, 3), False)], ids=["w4", "band"])
def test_gradients_match_naive(window, causal):
    layer = make_layer(window=window, causal=causal, num_kv_heads=2, bias=True)
    x = torch.randn(2, 13, 64, requires_grad=True)
    grad = torch.randn(2, 13, 64)
    layer(x).backward(grad)
    ours = [x.grad] + [p.grad for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    naive_layer(layer, x).backward(grad.double())
    theirs = [x.grad] + [p.grad for p in layer.parameters()]
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a, b.float(), atol=1e-4, rtol=1e-4, msg=name)


def test_position_ids_head_dim_and_no_rope():
    # explicit head_dim that is not hidden_size // num_heads, positions that do not start at 0, per-batch positions
    layer = make_layer(hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, rope_base=500.0)
    x = torch.randn(2, 9, 48)
    position_ids = torch.stack([torch.arange(100, 109), torch.arange(3, 21, 2)])
    out = layer(x, position_ids)
    torch.testing.assert_close(out, naive_layer(layer, x, position_ids).float(), atol=2e-5, rtol=1e-4)
    default = layer(x)
    torch.testing.assert_close(layer(x, torch.arange(9)), default)  # default is arange(T)
    torch.testing.assert_close(out[0], default[0], atol=1e-4, rtol=1e-3)  # RoPE is relative: a shift changes nothing
    assert not torch.allclose(out[1], default[1], atol=1e-3)  # but other spacings do

    plain = make_layer(window=3, rope=False)
    assert plain.rotary is None
    x = torch.randn(1, 7, 64)
    torch.testing.assert_close(plain(x), naive_layer(plain, x).float(), atol=2e-5, rtol=1e-4)


def test_state_dict_and_repr():
    layer = make_layer(num_kv_heads=2)
    assert set(layer.state_dict()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    assert layer.k_proj.weight.shape == (2 * 16, 64)
    text = repr(layer)
    for part in ("window=4", "num_heads=4", "num_kv_heads=2", "head_dim=16", "backend='auto'"):
        assert part in text


def test_trains():
    torch.manual_seed(0)
    teacher = make_layer(seed=1, num_kv_heads=2).requires_grad_(False)
    student = make_layer(seed=2, num_kv_heads=2, bias=True)
    x = torch.randn(4, 12, 64)
    target = teacher(x)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        optimizer.zero_grad()
        loss = F.mse_loss(student(x), target)
        loss.backward()
        if step == 0:
            for name, param in student.named_parameters():
                assert param.grad is not None, name
                assert torch.isfinite(param.grad).all(), name
                assert param.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="Triton needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
def test_triton_backend_matches_cpu():
    device = "cuda" if HAS_CUDA else "cpu"
    layer_cpu = make_layer(num_kv_heads=2, backend="cpu")
    layer_triton = make_layer(num_kv_heads=2, backend="triton", device=device)
    layer_triton.load_state_dict(layer_cpu.state_dict())
    x = torch.randn(1, 20, 64, requires_grad=True)
    x_triton = x.detach().to(device).requires_grad_()
    out_cpu, out_triton = layer_cpu(x), layer_triton(x_triton)
    torch.testing.assert_close(out_triton.cpu(), out_cpu, atol=1e-5, rtol=1e-4)

    grad = torch.randn_like(out_cpu)
    out_cpu.backward(grad)
    out_triton.backward(grad.to(device))
    torch.testing.assert_close(x_triton.grad.cpu(), x.grad, atol=1e-5, rtol=1e-4)
    for (name, p_cpu), p_triton in zip(layer_cpu.named_parameters(), layer_triton.parameters()):
        torch.testing.assert_close(p_triton.grad.cpu(), p_cpu.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu_float32():
    layer32 = make_layer(num_kv_heads=2, window=16)
    x = torch.randn(2, 300, 64)
    expected = layer32(x)  # the CPU float32 path is the truth here

    layer16 = make_layer(num_kv_heads=2, window=16, device="cuda", dtype=torch.bfloat16)
    layer16.load_state_dict(layer32.state_dict())
    baseline16 = make_layer(num_kv_heads=2, window=16, backend="reference", device="cuda", dtype=torch.bfloat16)
    baseline16.load_state_dict(layer32.state_dict())
    x16 = x.to("cuda", torch.bfloat16).requires_grad_()
    out = layer16(x16)
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    # DESIGN.md's rule: at most twice the error of PyTorch doing the same in bf16 (dense reference), plus a floor
    baseline = baseline16(x16.detach())
    assert_within_tolerance("layer output", out.float().cpu(), expected.detach(), baseline.float().cpu(),
                            torch.bfloat16)

    out.float().square().mean().backward()
    assert torch.isfinite(x16.grad).all()
    for name, param in layer16.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("kwargs, error, match", [
    ({"hidden_size": 65}, ValueError, r"hidden_size \(65\).*num_heads \(4\)"),
    ({"num_heads": 0}, ValueError, r"num_heads must be positive, got 0"),
    ({"hidden_size": 64.0}, TypeError, r"hidden_size must be an int, got float"),
    ({"num_kv_heads": 3}, ValueError, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    ({"head_dim": 17}, ValueError, r"head_dim must be even when rope=True, got 17"),
    ({"head_dim": 8}, ValueError, r"head_dim must be in \[16, 256\].*got 8"),
    ({"hidden_size": 32, "num_heads": 4}, ValueError, r"head_dim.*got 8 \(hidden_size 32 // num_heads 4\)"),
    ({"causal": 1}, TypeError, r"causal must be a bool"),
    ({"window": 0}, ValueError, r"window.*0"),
    ({"window": -2}, ValueError, r"window.*-2"),
    ({"window": 4, "causal": False}, ValueError, r"causal=True"),
    ({"window": (2, -3)}, ValueError, r"right.*-3"),
    ({"window": "4"}, TypeError, r"window"),
    ({"window": (1, 2, 3)}, TypeError, r"window"),
    ({"window": 2.5}, TypeError, r"window"),
    ({"backend": "gpu"}, ValueError, r"backend.*'gpu'"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_layer(**kwargs)


def test_bad_forward_input():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, T, 64\), got shape \(2, 5, 32\)"):
        layer(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, T, 64\), got shape \(5, 64\)"):
        layer(torch.randn(5, 64))
    with pytest.raises(ValueError, match=r"position_ids must be \(2, 5\) or \(5,\), got shape \(6,\)"):
        layer(torch.randn(2, 5, 64), torch.arange(6))
    with pytest.raises(TypeError, match=r"position_ids must be an integer tensor"):
        layer(torch.randn(2, 5, 64), torch.arange(5, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# RotaryEmbedding


def test_rotate_half_matches_transformers():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(rotate_half(x), llama.rotate_half(x), atol=0, rtol=0)


@pytest.mark.parametrize("head_dim, base", [(16, 10000.0), (40, 500000.0)])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_rope_matches_transformers(head_dim, base, batched_positions):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=head_dim, rope_theta=base)
    theirs = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(head_dim, base=base)
    torch.testing.assert_close(ours.inv_freq, theirs.inv_freq, atol=0, rtol=0)

    q, k = torch.randn(2, 4, 11, head_dim), torch.randn(2, 2, 11, head_dim)
    if batched_positions:
        position_ids = torch.stack([torch.arange(11), torch.arange(1000, 1011)])
        q_rot, k_rot = ours(q, k, position_ids)
    else:  # (T,) positions broadcast over the batch
        position_ids = torch.arange(7, 18)
        q_rot, k_rot = ours(q, k, position_ids)
        position_ids = position_ids[None].expand(2, -1)
    cos, sin = theirs(q, position_ids)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_rot, q_ref)
    torch.testing.assert_close(k_rot, k_ref)


def test_rope_dtype_and_buffer():
    rope = RotaryEmbedding(16)
    assert "inv_freq" not in rope.state_dict()
    assert rope.inv_freq.dtype == torch.float32
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    positions = torch.arange(7) + 4000
    q16, k16 = q.bfloat16(), k.bfloat16()
    q_rot, k_rot = rope(q16, k16, positions)
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    # computed in float32 and rounded once
    q_ref, k_ref = rope(q16.float(), k16.float(), positions)
    torch.testing.assert_close(q_rot, q_ref.bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(k_rot, k_ref.bfloat16(), atol=0, rtol=0)
    # a module cast to bf16 still uses float32 frequencies
    rope_cast = RotaryEmbedding(16).bfloat16()
    assert rope_cast.inv_freq.dtype == torch.bfloat16
    q_cast, _ = rope_cast(q, k, positions)
    torch.testing.assert_close(q_cast, rope(q, k, positions)[0], atol=0, rtol=0)


def test_rope_bad_arguments():
    with pytest.raises(ValueError, match=r"head_dim must be a positive even number.*got 15"):
        RotaryEmbedding(15)
    with pytest.raises(TypeError, match=r"head_dim must be an int"):
        RotaryEmbedding(16.0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    with pytest.raises(ValueError, match=r"q has head_dim 8, expected 16"):
        rope(torch.randn(2, 4, 7, 8), k, torch.arange(7))
    with pytest.raises(ValueError, match=r"position_ids must be \(2, 7\) or \(7,\), got shape \(3, 7\)"):
        rope(q, k, torch.zeros(3, 7, dtype=torch.long))
