"""Drop-in layers on `hr.hybrid_attention`: HybridAttention, SparseGlobalAttention, and RetrievalCrossAttention."""
import pytest
import torch
import torch.nn.functional as F

from hybridrag import hybrid_attention
from hybridrag.nn import HybridAttention, RetrievalCrossAttention, SlidingWindowAttention, SparseGlobalAttention

HAS_CUDA = torch.cuda.is_available()
BACKEND = "cpu"  # the tiled PyTorch path; the Triton kernels have their own tests


# ----------------------------------------------------------------------------------------------------------------
# helpers: the layers' computations written out by hand in float64 with the layers' own weights


def naive_rope(x, position_ids, base):
    """x (B, h, T, D), position_ids (B, T) or (T,) -> rotate-half RoPE in float64."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    emb = position_ids.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat((emb, emb), dim=-1)
    if emb.dim() == 3:
        emb = emb[:, None]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def linear64(linear, x):
    bias = None if linear.bias is None else linear.bias.double()
    return F.linear(x.double(), linear.weight.double(), bias)


def heads(linear, x, num_heads, head_dim):
    batch, length, _ = x.shape
    return linear64(linear, x).view(batch, length, num_heads, head_dim).transpose(1, 2)


def naive_hybrid(layer, x, landmarks, position_ids=None, kv_start=None):
    """HybridAttention's forward in float64: projections, RoPE, the reference op with explicit landmarks, o_proj."""
    batch, length, _ = x.shape
    q = heads(layer.q_proj, x, layer.num_heads, layer.head_dim)
    k = heads(layer.k_proj, x, layer.num_kv_heads, layer.head_dim)
    v = heads(layer.v_proj, x, layer.num_kv_heads, layer.head_dim)
    if layer.rotary is not None:
        pos = torch.arange(length) if position_ids is None else position_ids
        q, k = naive_rope(q, pos, layer.rotary.base), naive_rope(k, pos, layer.rotary.base)
    memory_k = None if layer.memory_k is None else layer.memory_k.double()
    memory_v = None if layer.memory_v is None else layer.memory_v.double()
    o = hybrid_attention(q, k, v, layer.window, landmarks=landmarks, global_queries=layer.global_queries,
                         memory_k=memory_k, memory_v=memory_v, causal=layer.causal, kv_start=kv_start,
                         backend="reference")
    return linear64(layer.o_proj, o.transpose(1, 2).reshape(batch, length, -1))


def make_hybrid(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "window": 4, "backend": BACKEND}
    config.update(kwargs)
    return HybridAttention(**config)


def make_sparse(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "window": 3, "landmark_stride": 4,
              "num_learned_landmarks": 2, "backend": BACKEND}
    config.update(kwargs)
    return SparseGlobalAttention(**config)


def make_cross(seed=0, gate=None, scorer=False, **kwargs):
    """A RetrievalCrossAttention; gate fills tanh's argument, scorer=True draws the (zero-initialised) scorer."""
    torch.manual_seed(seed)
    config = {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2}
    config.update(kwargs)
    layer = RetrievalCrossAttention(**config)
    with torch.no_grad():
        if gate is not None:
            layer.gate.fill_(gate)
        if scorer:
            layer.relevance_scorer.weight.normal_(0.0, 3.0)
            layer.relevance_scorer.bias.fill_(0.3)
    return layer


def assert_changed(a, b, what):
    assert (a - b).abs().max() > 1e-4, f"{what} should change"


def assert_unchanged(a, b, what):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=what)


def check_trains(layer, inputs, target, steps=15, lr=3e-3, factor=0.5, all_params=True):
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        out = layer(*inputs)
        loss = F.mse_loss(out, target)
        loss.backward()
        if step == 0 and all_params:
            for name, param in layer.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
                assert param.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < factor * losses[0], losses


# ----------------------------------------------------------------------------------------------------------------
# HybridAttention


@pytest.mark.parametrize("length", [1, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_shape_and_dtype(length, dtype):
    layer = make_hybrid(landmark_stride=4, num_memory_tokens=3, dtype=dtype)
    assert layer.memory_k.shape == layer.memory_v.shape == (1, 2, 3, 16)
    assert layer.memory_k.dtype == dtype
    x = torch.randn(2, length, 64, dtype=dtype)
    out = layer(x)
    assert out.shape == (2, length, 64) and out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("config", [
    {"landmark_stride": 4, "num_memory_tokens": 3},
    {"landmark_stride": 5, "global_queries": False, "num_kv_heads": 1},
    {"num_landmarks": 3, "num_memory_tokens": 2, "window": (2, 3), "causal": False, "bias": True},
    {"num_memory_tokens": 4, "window": (-1, 0), "rope": False, "num_kv_heads": 4},
    {"landmark_stride": 3, "window": 1},
], ids=["stride_memory", "stride_local_rows_mqa", "count_bidirectional", "memory_only_full", "stride_w1"])
def test_hybrid_matches_reference_float64(config):
    layer = make_hybrid(**config)
    x = torch.randn(2, 13, 64)
    expected = naive_hybrid(layer, x, layer.landmarks_for(13))
    torch.testing.assert_close(layer(x), expected.float(), atol=2e-5, rtol=1e-4)
    # the same layer in float64 on the reference backend (RotaryEmbedding's angles are float32 by design)
    layer64 = make_hybrid(**config, backend="reference", dtype=torch.float64)
    layer64.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer64(x.double()), expected, atol=1e-7, rtol=1e-6)


def test_hybrid_gradients_match_reference():
    layer = make_hybrid(landmark_stride=4, num_memory_tokens=3, bias=True)
    x = torch.randn(2, 13, 64, requires_grad=True)
    grad = torch.randn(2, 13, 64)
    layer(x).backward(grad)
    ours = [x.grad] + [p.grad for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    naive_hybrid(layer, x, 4).backward(grad.double())
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, a, b in zip(names, ours, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b.float(), atol=1e-4, rtol=1e-4, msg=name)


def test_hybrid_position_ids_and_kv_start():
    layer = make_hybrid(landmark_stride=3, num_memory_tokens=2)
    x = torch.randn(2, 9, 64)
    position_ids = torch.stack([torch.arange(100, 109), torch.arange(3, 21, 2)])
    torch.testing.assert_close(layer(x, position_ids=position_ids),
                               naive_hybrid(layer, x, 3, position_ids=position_ids).float(), atol=2e-5, rtol=1e-4)
    # left padding: keys before kv_start[b] (landmarks among them) are seen by no query
    kv_start = torch.tensor([0, 4])
    out = layer(x, kv_start=kv_start)
    torch.testing.assert_close(out, naive_hybrid(layer, x, 3, kv_start=kv_start).float(), atol=2e-5, rtol=1e-4)
    perturbed = x.clone()
    perturbed[1, :4] += 5.0
    out_perturbed = layer(perturbed, kv_start=kv_start)
    assert_unchanged(out_perturbed[1, 4:], out[1, 4:], "real tokens after the padding")
    assert_unchanged(out_perturbed[0], out[0], "the other batch row")


def test_landmarks_by_count():
    layer = make_hybrid(num_landmarks=4)
    torch.testing.assert_close(layer.landmarks_for(10), torch.tensor([0, 2, 5, 7]))
    torch.testing.assert_close(layer.landmarks_for(16), torch.tensor([0, 4, 8, 12]))
    torch.testing.assert_close(layer.landmarks_for(3), torch.tensor([0, 1, 2]))  # more landmarks than tokens: all
    assert layer.landmarks_for(10).dtype == torch.long

    x = torch.randn(2, 10, 64)
    expected = naive_hybrid(layer, x, torch.tensor([0, 2, 5, 7]))  # explicit positions
    torch.testing.assert_close(layer(x), expected.float(), atol=2e-5, rtol=1e-4)
    # on a length the count divides, it is the stride T / n
    by_stride = make_hybrid(landmark_stride=4)
    by_stride.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 64)
    torch.testing.assert_close(layer(x), by_stride(x), atol=1e-6, rtol=1e-5)
    # landmarks matter: without them the output differs
    plain = make_hybrid()
    plain.load_state_dict(layer.state_dict())
    assert_changed(layer(x), plain(x), "landmarks")


def test_memory_tokens_receive_gradients():
    layer = make_hybrid(landmark_stride=4, num_memory_tokens=3)
    x = torch.randn(2, 13, 64)
    out = layer(x)
    out.square().mean().backward()
    for name in ("memory_k", "memory_v"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.shape == (1, 2, 3, 16), name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # the memory tokens take part: moving them moves the output
    with torch.no_grad():
        layer.memory_v.add_(1.0)
    assert_changed(layer(x), out, "output after moving memory_v")
    assert set(layer.state_dict()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                       "memory_k", "memory_v"}
    assert make_hybrid().memory_k is None


def test_hybrid_trains():
    teacher = make_hybrid(seed=1, landmark_stride=4, num_memory_tokens=2).requires_grad_(False)
    student = make_hybrid(seed=2, landmark_stride=4, num_memory_tokens=2, bias=True)
    x = torch.randn(4, 12, 64)
    check_trains(student, (x,), teacher(x))


def test_hybrid_repr():
    text = repr(make_hybrid(num_landmarks=3, num_memory_tokens=2))
    for part in ("window=4", "num_landmarks=3", "num_memory_tokens=2", "num_kv_heads=2", "backend='cpu'"):
        assert part in text


@pytest.mark.parametrize("kwargs, error, match", [
    ({"landmark_stride": 4, "num_landmarks": 2}, ValueError,
     r"landmark_stride or num_landmarks, not both.*landmark_stride=4 and num_landmarks=2"),
    ({"landmark_stride": 0}, ValueError, r"landmark_stride must be positive, got 0"),
    ({"num_landmarks": 2.0}, TypeError, r"num_landmarks must be an int, got float"),
    ({"num_memory_tokens": -1}, ValueError, r"num_memory_tokens must be >= 0, got -1"),
    ({"num_memory_tokens": True}, TypeError, r"num_memory_tokens must be an int, got bool"),
    ({"global_queries": 1}, TypeError, r"global_queries must be a bool, got int"),
    ({"causal": "yes"}, TypeError, r"causal must be a bool"),
    ({"window": 4, "causal": False}, ValueError, r"causal=True"),
    ({"window": 0}, ValueError, r"window.*0"),
    ({"num_kv_heads": 3}, ValueError, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    ({"hidden_size": 65}, ValueError, r"hidden_size \(65\).*num_heads \(4\)"),
    ({"head_dim": 8}, ValueError, r"head_dim must be in \[16, 256\].*got 8"),
    ({"head_dim": 17}, ValueError, r"head_dim must be even when rope=True, got 17"),
    ({"backend": "gpu"}, ValueError, r"backend.*'gpu'"),
])
def test_hybrid_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_hybrid(**kwargs)


def test_hybrid_window_is_required():
    with pytest.raises(TypeError, match=r"window"):
        HybridAttention(64, 4)


def test_hybrid_bad_forward_input():
    layer = make_hybrid(landmark_stride=4)
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, T, 64\), got shape \(2, 5, 32\)"):
        layer(torch.randn(2, 5, 32))
    with pytest.raises(TypeError, match=r"hidden_states must be a tensor, got list"):
        layer([[0.0] * 64])
    with pytest.raises(TypeError, match=r"hidden_states must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.zeros(2, 5, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must be \(2, 5\) or \(5,\), got shape \(6,\)"):
        layer(torch.randn(2, 5, 64), position_ids=torch.arange(6))
    with pytest.raises(ValueError, match=r"kv_start must have shape \(2,\).*got \(3,\)"):
        layer(torch.randn(2, 5, 64), kv_start=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"kv_start must be an integer tensor"):
        layer(torch.randn(2, 5, 64), kv_start=torch.zeros(2))
    with pytest.raises(TypeError, match=r"positional"):
        layer(torch.randn(2, 5, 64), torch.arange(5))  # position_ids is keyword-only


# ----------------------------------------------------------------------------------------------------------------
# SparseGlobalAttention


def naive_sparse(layer, x, landmark_states=None):
    """SparseGlobalAttention in float64: prepend the learned landmarks, RoPE at (-G..-1, 0..T-1), the reference op with
    the landmark positions written out, strip the landmark rows."""
    batch, length, _ = x.shape
    groups, stride = layer.num_learned_landmarks, layer.landmark_stride
    ext = x.double()
    if groups:
        states = layer.landmark_embeddings[None] if landmark_states is None else landmark_states
        ext = torch.cat([states.double().expand(batch, -1, -1), ext], dim=1)
    q = heads(layer.q_proj, ext, layer.num_heads, layer.head_dim)
    k = heads(layer.k_proj, ext, layer.num_kv_heads, layer.head_dim)
    v = heads(layer.v_proj, ext, layer.num_kv_heads, layer.head_dim)
    pos = torch.arange(-groups, length)
    q, k = naive_rope(q, pos, layer.rotary.base), naive_rope(k, pos, layer.rotary.base)
    landmarks = list(range(groups)) + ([groups + i for i in range(0, length, stride)] if stride else [])
    o = hybrid_attention(q, k, v, layer.window, landmarks=torch.tensor(landmarks), global_queries=True,
                         causal=layer.causal, backend="reference")
    out = linear64(layer.o_proj, o.transpose(1, 2).reshape(batch, groups + length, -1))
    return out[:, groups:], out[:, :groups]


@pytest.mark.parametrize("config", [
    {},
    {"window": (2, 1), "causal": False},
    {"landmark_stride": None, "num_learned_landmarks": 3, "window": (1, 1), "causal": False, "bias": True},
    {"num_learned_landmarks": 0, "landmark_stride": 5},
], ids=["causal", "bidirectional", "learned_only", "stride_only"])
def test_sparse_matches_reference_float64(config):
    layer = make_sparse(**config)
    x = torch.randn(2, 13, 64)
    out, landmark_out = layer(x, return_landmarks=True)
    expected, expected_landmarks = naive_sparse(layer, x)
    assert out.shape == (2, 13, 64) and landmark_out.shape == (2, layer.num_learned_landmarks, 64)
    torch.testing.assert_close(out, expected.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(landmark_out, expected_landmarks.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer(x), out)


def test_sparse_learned_landmarks_bidirectional():
    """Window (1, 1), two learned landmarks and no stride: a far token reaches a landmark row, and other tokens only
    through the landmarks (in the next layer); every token sees the landmarks."""
    layer = make_sparse(landmark_stride=None, window=(1, 1), causal=False)
    second = make_sparse(seed=1, landmark_stride=None, window=(1, 1), causal=False)
    x = torch.randn(2, 16, 64)
    far = x.clone()
    far[:, 12] += 3.0
    out, lm_out = layer(x, return_landmarks=True)
    out_far, lm_out_far = layer(far, return_landmarks=True)
    assert_changed(lm_out_far, lm_out, "the landmark rows (they see every token)")
    assert_changed(out_far[:, 11:14], out[:, 11:14], "the perturbed token's window")
    assert_unchanged(out_far[:, :11], out[:, :11], "tokens outside the window, in one layer")
    assert_unchanged(out_far[:, 14:], out[:, 14:], "tokens outside the window, in one layer")

    # a token sees the learned landmarks: moving them moves every token's output
    states = layer.landmark_embeddings[None].detach().clone()
    moved = states.clone()
    moved[:, 1] += 3.0
    assert_unchanged(layer(x, landmark_states=states), out, "explicit landmark_states equal to the embeddings")
    diff = (layer(x, landmark_states=moved) - out).abs().amax(dim=-1)
    assert (diff > 1e-4).all(), diff

    # two layers with the landmark states carried over: the far token now reaches token 3 through the landmarks
    def stack(inp, carry):
        out1, lm1 = layer(inp, landmark_states=states, return_landmarks=True)
        return second(inp + out1, landmark_states=states + lm1 if carry else states)

    assert_changed(stack(far, True)[:, 3], stack(x, True)[:, 3], "token 3 after two layers, through the landmarks")
    assert_unchanged(stack(far, False)[:, 3], stack(x, False)[:, 3], "token 3, landmark states not carried")


def test_sparse_causal_property():
    """Causal, window 3, stride 4 (landmarks 0, 4, 8, 12) and one learned landmark."""
    layer = make_sparse(num_learned_landmarks=1)
    x = torch.randn(1, 16, 64)
    out, lm_out = layer(x, return_landmarks=True)

    local = x.clone()
    local[:, 9] += 3.0  # not a landmark
    out_local, lm_local = layer(local, return_landmarks=True)
    assert_unchanged(out_local[:, :9], out[:, :9], "earlier tokens (causal)")
    assert_changed(out_local[:, 9:12], out[:, 9:12], "the window after token 9")
    assert_changed(out_local[:, 12], out[:, 12], "landmark row 12 (sees every earlier token)")
    assert_unchanged(out_local[:, 13:], out[:, 13:], "later tokens outside the window")
    assert_unchanged(lm_local, lm_out, "the learned landmark row (it precedes every token)")

    landmark = x.clone()
    landmark[:, 4] += 3.0  # a stride landmark: every later token sees its key
    out_landmark = layer(landmark)
    assert_unchanged(out_landmark[:, :4], out[:, :4], "earlier tokens (causal)")
    diff = (out_landmark[:, 4:] - out[:, 4:]).abs().amax(dim=-1)
    assert (diff > 1e-4).all(), diff


def test_sparse_rope_shift_invariance_and_position_ids():
    layer = make_sparse(window=(2, 2), causal=False)
    x = torch.randn(2, 9, 64)
    base = layer(x)
    torch.testing.assert_close(layer(x, position_ids=torch.arange(9) + 500), base, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(layer(x, position_ids=torch.arange(9)[None]), base)
    spaced = torch.stack([torch.arange(9), torch.arange(0, 18, 2)])
    assert_changed(layer(x, position_ids=spaced)[1], base[1], "other spacings")


def test_sparse_gradients_and_trains():
    layer = make_sparse(window=(2, 1), causal=False)
    x = torch.randn(2, 12, 64)
    out, lm_out = layer(x, return_landmarks=True)
    (out.square().mean() + lm_out.square().mean()).backward()
    grad = layer.landmark_embeddings.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    teacher = make_sparse(seed=1, window=(2, 1), causal=False).requires_grad_(False)
    student = make_sparse(seed=2, window=(2, 1), causal=False, bias=True)
    x = torch.randn(4, 12, 64)
    check_trains(student, (x,), teacher(x))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"landmark_stride": None, "num_learned_landmarks": 0}, ValueError,
     r"needs landmarks.*landmark_stride=None, num_learned_landmarks=0"),
    ({"num_learned_landmarks": -2}, ValueError, r"num_learned_landmarks must be >= 0, got -2"),
    ({"num_learned_landmarks": 1.5}, TypeError, r"num_learned_landmarks must be an int, got float"),
    ({"landmark_stride": -1}, ValueError, r"landmark_stride must be positive, got -1"),
    ({"window": 3, "causal": False}, ValueError, r"causal=True"),
    ({"window": (2, -5), "causal": False}, ValueError, r"right.*-5"),
    ({"num_heads": 0}, ValueError, r"num_heads must be positive, got 0"),
    ({"backend": "cuda"}, ValueError, r"backend.*'cuda'"),
])
def test_sparse_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_sparse(**kwargs)


def test_sparse_bad_forward_input():
    layer = make_sparse()
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, T, 64\), got shape \(2, 5, 63\)"):
        layer(torch.randn(2, 5, 63))
    with pytest.raises(ValueError, match=r"landmark_states must be \(1 or 2, 2, 64\).*got shape \(2, 3, 64\)"):
        layer(x, landmark_states=torch.randn(2, 3, 64))
    with pytest.raises(TypeError, match=r"landmark_states has dtype torch.float64 but hidden_states has torch.float32"):
        layer(x, landmark_states=torch.randn(1, 2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"position_ids must be \(2, 5\) or \(5,\), got shape \(7,\)"):
        layer(x, position_ids=torch.arange(7))
    with pytest.raises(TypeError, match=r"position_ids must be an integer tensor"):
        layer(x, position_ids=torch.arange(5.0))
    with pytest.raises(TypeError, match=r"return_landmarks must be a bool"):
        layer(x, return_landmarks=1)
    with pytest.raises(ValueError, match=r"landmark_states was given but the layer has num_learned_landmarks=0"):
        make_sparse(num_learned_landmarks=0)(x, landmark_states=torch.randn(1, 2, 64))


# ----------------------------------------------------------------------------------------------------------------
# RetrievalCrossAttention


def retrieval_inputs(batch=2, length=9, segments=3, seg_len=5, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 64, generator=generator)
    retrieved = torch.randn(batch, segments, seg_len, 64, generator=generator)
    mask = torch.ones(batch, segments, seg_len, dtype=torch.bool)
    mask[0, 1, 3:] = False  # a partly padded segment
    mask[1, 2] = False  # an all-padding segment
    return x, retrieved, mask


def naive_cross(layer, x, retrieved, mask):
    """RetrievalCrossAttention in float64, with the relevance written out segment by segment."""
    batch, length, hidden = x.shape
    segments, seg_len = retrieved.shape[1:3]
    x, retrieved = x.double(), retrieved.double().masked_fill(~mask[..., None], 0)
    weight = layer.relevance_scorer.weight.double()[0] * hidden ** -0.5
    scorer_bias = layer.relevance_scorer.bias.double()
    logits = torch.zeros(batch, length, segments, dtype=torch.float64)
    for b in range(batch):
        for s in range(segments):
            seg_mean = retrieved[b, s][mask[b, s]].sum(0) / max(int(mask[b, s].sum()), 1)
            for t in range(length):
                q_mean = x[b, : t + 1].mean(0) if layer.causal else x[b].mean(0)
                features = torch.cat([q_mean * seg_mean, seg_mean])
                logits[b, t, s] = features @ weight + scorer_bias
    relevance = torch.sigmoid(logits) * mask.any(-1)[:, None, :]
    q = heads(layer.q_proj, x, layer.num_heads, layer.head_dim)
    flat = retrieved.reshape(batch, segments * seg_len, hidden)
    group = layer.num_heads // layer.num_kv_heads
    k = heads(layer.k_proj, flat, layer.num_kv_heads, layer.head_dim).repeat_interleave(group, 1)
    v = heads(layer.v_proj, flat, layer.num_kv_heads, layer.head_dim).repeat_interleave(group, 1)
    bias = torch.log(torch.sigmoid(logits))[..., None].expand(-1, -1, -1, seg_len).reshape(batch, 1, length, -1)
    bias = bias.masked_fill(~mask.reshape(batch, 1, 1, -1), float("-inf"))
    probs = torch.softmax(q @ k.transpose(-1, -2) * layer.head_dim ** -0.5 + bias, dim=-1)
    o = torch.nan_to_num(probs) @ v  # a row with no real key: zeros
    attn = linear64(layer.o_proj, o.transpose(1, 2).reshape(batch, length, -1))
    return x + torch.tanh(layer.gate.double()) * attn, relevance


def test_cross_zero_gate_returns_input():
    layer = make_cross(scorer=True)
    x, retrieved, mask = retrieval_inputs()
    out, relevance = layer(x, retrieved, mask, return_relevance=True)
    assert torch.equal(out, x)
    assert relevance.shape == (2, 9, 3) and relevance.dtype == torch.float32
    assert (relevance[1, :, 2] == 0).all()  # an all-padding segment has relevance 0
    # a fresh scorer: every segment 1/2, a uniform bias that changes nothing
    _, relevance = make_cross()(x, retrieved, mask, return_relevance=True)
    torch.testing.assert_close(relevance[0], torch.full((9, 3), 0.5))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cross_matches_naive(causal, backend):
    layer = make_cross(gate=0.7, scorer=True, causal=causal, backend=backend, bias=True)
    x, retrieved, mask = retrieval_inputs()
    out, relevance = layer(x, retrieved, mask, return_relevance=True)
    expected, expected_relevance = naive_cross(layer, x, retrieved, mask)
    torch.testing.assert_close(relevance, expected_relevance.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, expected.float(), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(relevance, torch.full_like(relevance, 0.5) * mask.any(-1)[:, None], atol=1e-2)


def test_cross_causal_relevance_does_not_see_later_tokens():
    x, retrieved, mask = retrieval_inputs()
    later = x.clone()
    later[:, 6] += 3.0
    causal = make_cross(gate=0.7, scorer=True)
    assert_unchanged(causal(later, retrieved, mask)[:, :6], causal(x, retrieved, mask)[:, :6], "earlier tokens")
    encoder = make_cross(gate=0.7, scorer=True, causal=False)  # pools all tokens: earlier outputs move
    assert_changed(encoder(later, retrieved, mask)[:, :6], encoder(x, retrieved, mask)[:, :6], "earlier tokens")


def test_cross_all_padding_gives_no_nan():
    layer = make_cross(gate=0.7, scorer=True)
    x, retrieved, mask = retrieval_inputs()
    mask[1] = False  # batch row 1 has no real retrieved token at all
    x.requires_grad_()
    retrieved.requires_grad_()
    out, relevance = layer(x, retrieved, mask, return_relevance=True)
    assert torch.isfinite(out).all() and torch.isfinite(relevance).all()
    assert torch.equal(out[1], x[1])  # the attention row is zeros (no o_proj bias here)
    assert (relevance[1] == 0).all()
    out.square().sum().backward()
    for name, grad in [("x", x.grad), ("retrieved", retrieved.grad)] + \
            [(name, p.grad) for name, p in layer.named_parameters()]:
        assert grad is not None and torch.isfinite(grad).all(), name
    assert (retrieved.grad[1] == 0).all()


def test_cross_padding_tokens_do_not_affect_output():
    layer = make_cross(gate=0.7, scorer=True)
    x, retrieved, mask = retrieval_inputs()
    out, relevance = layer(x, retrieved, mask, return_relevance=True)
    for garbage in (5.0, float("nan"), float("inf")):
        perturbed = retrieved.clone()
        perturbed[~mask] = garbage
        out_p, relevance_p = layer(x, perturbed, mask, return_relevance=True)
        assert torch.equal(out_p, out), garbage
        assert torch.equal(relevance_p, relevance), garbage
    real = retrieved.clone()
    real[0, 1, 0] += 3.0  # a real token of that segment does matter
    assert_changed(layer(x, real, mask), out, "output after moving a real retrieved token")


def test_cross_gradients_reach_gate_and_scorer():
    x, retrieved, mask = retrieval_inputs()
    layer = make_cross()
    layer(x, retrieved, mask).square().mean().backward()
    assert layer.gate.grad.abs().sum() > 0  # at init only the gate learns (tanh(0) = 0 closes the others off)
    assert (layer.relevance_scorer.weight.grad == 0).all()

    layer = make_cross(gate=0.5)  # an open gate: the zero scorer's weights get gradients and leave zero
    layer(x, retrieved, mask).square().mean().backward()
    assert layer.relevance_scorer.weight.grad.abs().sum() > 0
    # (its bias does not yet: with every segment scored alike, a shared shift of the logits is a uniform bias; zero
    # up to rounding, whose size depends on the reduction order and so on the thread count)
    scale = layer.relevance_scorer.weight.grad.abs().max()
    assert (layer.relevance_scorer.bias.grad.abs() <= 1e-4 * scale).all()

    layer = make_cross(gate=0.5, scorer=True)
    x.requires_grad_()
    retrieved.requires_grad_()
    layer(x, retrieved, mask).square().mean().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert retrieved.grad.abs().sum() > 0 and (retrieved.grad[~mask] == 0).all()


def test_cross_trains():
    teacher = make_cross(seed=1, gate=1.0, scorer=True).requires_grad_(False)
    student = make_cross(seed=2)
    x, retrieved, mask = retrieval_inputs(batch=4)
    check_trains(student, (x, retrieved, mask), teacher(x, retrieved, mask), steps=30, lr=1e-2, all_params=False)
    assert (student.gate != 0).all() and (student.relevance_scorer.weight != 0).any()


def test_cross_dtype_gqa_and_default_mask():
    layer = make_cross(gate=0.3, num_heads=8, num_kv_heads=1, dtype=torch.bfloat16)
    x, retrieved, _ = retrieval_inputs()
    out = layer(x.bfloat16(), retrieved.bfloat16())
    assert out.shape == (2, 9, 64) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    layer32 = make_cross(gate=0.3, num_heads=8, num_kv_heads=1)
    full = torch.ones(2, 3, 5, dtype=torch.bool)
    torch.testing.assert_close(layer32(x, retrieved), layer32(x, retrieved, full))
    assert "causal=True" in repr(layer32) and "num_kv_heads=1" in repr(layer32)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_kv_heads": 3}, ValueError, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    ({"hidden_size": 66}, ValueError, r"hidden_size \(66\).*num_heads \(4\)"),
    ({"head_dim": 0}, ValueError, r"head_dim must be positive, got 0"),
    ({"causal": None}, TypeError, r"causal must be a bool, got NoneType"),
    ({"backend": "cpu"}, ValueError, r"backend must be one of \('auto', 'reference'\), got 'cpu'"),
])
def test_cross_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_cross(**kwargs)


def test_cross_bad_forward_input():
    layer = make_cross()
    x, retrieved, mask = retrieval_inputs()
    with pytest.raises(ValueError, match=r"retrieved must be \(2, S, L, 64\).*got shape \(2, 5, 64\)"):
        layer(x, retrieved[:, 0])
    with pytest.raises(ValueError, match=r"retrieved must be \(2, S, L, 64\).*got shape \(1, 3, 5, 64\)"):
        layer(x, retrieved[:1])
    with pytest.raises(ValueError, match=r"retrieved must be \(2, S, L, 64\).*S, L >= 1.*\(2, 0, 5, 64\)"):
        layer(x, retrieved[:, :0])
    with pytest.raises(TypeError, match=r"retrieved has dtype torch.float64 but hidden_states has torch.float32"):
        layer(x, retrieved.double())
    with pytest.raises(TypeError, match=r"retrieved must be a tensor, got NoneType"):
        layer(x, None)
    with pytest.raises(TypeError, match=r"retrieved_mask must be a bool tensor.*got dtype torch.int64"):
        layer(x, retrieved, mask.long())
    with pytest.raises(ValueError, match=r"retrieved_mask must have shape \(2, 3, 5\).*got \(2, 3, 4\)"):
        layer(x, retrieved, mask[..., :4])
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, T, 64\), got shape \(9, 64\)"):
        layer(x[0], retrieved, mask)
    with pytest.raises(TypeError, match=r"return_relevance must be a bool"):
        layer(x, retrieved, mask, return_relevance="yes")


# ----------------------------------------------------------------------------------------------------------------
# CUDA: the same layers on the GPU against the CPU float32 path


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_cuda_layers_match_cpu(backend):
    x = torch.randn(2, 40, 64)
    cases = [
        (make_hybrid(landmark_stride=8, num_memory_tokens=3),
         make_hybrid(landmark_stride=8, num_memory_tokens=3, backend=backend, device="cuda"), (x,)),
        (make_sparse(window=(3, 2), causal=False),
         make_sparse(window=(3, 2), causal=False, backend=backend, device="cuda"), (x,)),
    ]
    _, retrieved, mask = retrieval_inputs()
    cross_backend = "auto" if backend == "auto" else "reference"
    cases.append((make_cross(gate=0.5, scorer=True),
                  make_cross(gate=0.5, scorer=True, backend=cross_backend, device="cuda"), (x, retrieved, mask)))
    for cpu_layer, cuda_layer, inputs in cases:
        cuda_layer.load_state_dict(cpu_layer.state_dict())
        expected = cpu_layer(*inputs)
        cuda_inputs = [t.to("cuda") for t in inputs]
        cuda_inputs[0].requires_grad_()
        out = cuda_layer(*cuda_inputs)
        assert out.device.type == "cuda"
        # TF32 matmuls may be on: a loose bound, the float64 CPU tests hold the exact semantics
        torch.testing.assert_close(out.cpu(), expected, atol=2e-3, rtol=2e-3, msg=type(cpu_layer).__name__)
        out.square().mean().backward()
        for name, param in cuda_layer.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("make", [
    lambda: SlidingWindowAttention(64, 4, window=(3, 3), causal=False, num_kv_heads=2),
    lambda: HybridAttention(64, 4, num_kv_heads=2, window=4, landmark_stride=5, num_memory_tokens=2),
    lambda: SparseGlobalAttention(64, 4, window=(3, 3), causal=False, landmark_stride=6, num_learned_landmarks=2),
], ids=["window", "hybrid", "sparse-global"])
def test_layers_take_a_key_mask_like_the_reference(make):
    """input_ids.ne(pad)-style masks with holes anywhere: the layer equals itself on the dense reference, and a
    hidden token changes nothing when its content changes."""
    layer = make()
    x = torch.randn(2, 17, 64)
    key_mask = torch.rand(2, 17) > 0.3
    key_mask[:, 0] = True
    got = layer(x, key_mask=key_mask)
    layer.backend = "reference"
    want = layer(x, key_mask=key_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    hidden = (~key_mask[0]).nonzero()[0, 0]
    changed = x.clone()
    changed[0, hidden] += 10.0
    visible_rows = key_mask[0].clone()
    visible_rows[hidden] = False  # the hidden token's own output changes (its query is new)
    torch.testing.assert_close(layer(changed, key_mask=key_mask)[0, visible_rows], want[0, visible_rows], rtol=1e-5,
                               atol=1e-5)
