"""selected_block_attention and select_blocks: the selection against a brute-force one, outputs and gradients
against a float64 dense reference over the chosen tokens, causality, key padding, odd shapes, grouped-query heads,
non-contiguous inputs, and bad input."""
import pytest
import torch

from hybridrag.ops.block_selection import block_key_bounds, select_blocks, selected_block_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_selection(q, k, block_size, top_k, scale, key_mask=None):
    """select_blocks, one query and block at a time in float64: (B, Hkv, T) lists of chosen block ids."""
    batch, heads, length, dim = q.shape
    kv_heads, group = k.shape[1], heads // k.shape[1]
    count = length // block_size
    chosen = [[[[] for _ in range(length)] for _ in range(kv_heads)] for _ in range(batch)]
    for b in range(batch):
        keys = [k[b, :, j * block_size:(j + 1) * block_size].double() for j in range(count)]  # (Hkv, s, D) each
        real = [torch.ones(block_size, dtype=torch.bool) if key_mask is None
                else key_mask[b, j * block_size:(j + 1) * block_size] for j in range(count)]
        for h in range(kv_heads):
            for t in range(length):
                allowed = [j for j in range(min(t // block_size, count)) if real[j].any()]
                if not allowed:
                    continue
                totals = torch.zeros(count, dtype=torch.float64)
                for g in range(group):
                    row = q[b, h * group + g, t].double()
                    bounds = torch.full((count,), -torch.inf, dtype=torch.float64)
                    for j in allowed:
                        bounds[j] = (row * keys[j][h][real[j]]).max(0).values.sum() * scale
                    totals += torch.softmax(bounds, 0)
                chosen[b][h][t] = sorted(sorted(allowed, key=lambda j: -float(totals[j]))[:top_k])
    return chosen


def dense_reference(q, k, v, block_size, indices, valid, scale, key_mask=None, dtype=torch.float64):
    """Softmax of every query over the tokens of its valid chosen blocks, in `dtype` (B, H, T, D)."""
    batch, heads, length, dim = q.shape
    kv_heads, group = k.shape[1], heads // k.shape[1]
    allowed = torch.zeros(batch, kv_heads, length, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(kv_heads):
            for t in range(length):
                for j, ok in zip(indices[b, h, t].tolist(), valid[b, h, t].tolist()):
                    if ok:
                        allowed[b, h, t, j * block_size:(j + 1) * block_size] = True
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    allowed = allowed.repeat_interleave(group, dim=1)
    kd, vd = (t.to(dtype).repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.to(dtype) @ kd.transpose(-1, -2) * scale).masked_fill(~allowed, -torch.inf)
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ vd


def make(batch, heads, kv_heads, length, dim, seed=0, contiguous=True):
    generator = torch.Generator().manual_seed(seed)
    if contiguous:
        shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
        return [torch.randn(s, generator=generator) for s in shapes]
    # (B, T, heads, D) storage seen as (B, heads, T, D), as the layers' projections give them
    return [torch.randn(batch, length, h, dim, generator=generator).transpose(1, 2)
            for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("length, dim, heads, kv_heads, block, top", [
    (1, 40, 2, 2, 4, 2), (15, 64, 4, 2, 4, 2), (63, 40, 2, 1, 8, 3), (113, 100, 2, 2, 16, 4), (300, 128, 2, 1, 32, 2)])
def test_selection_equals_brute_force(length, dim, heads, kv_heads, block, top):
    q, k, _ = make(1, heads, kv_heads, length, dim)
    scale = dim ** -0.5
    indices, valid = select_blocks(q, k, block, top, scale)
    expected = brute_force_selection(q, k, block, top, scale)
    for h in range(kv_heads):
        for t in range(length):
            got = sorted(j for j, ok in zip(indices[0, h, t].tolist(), valid[0, h, t].tolist()) if ok)
            assert got == expected[0][h][t], (h, t)
            assert all(j < t // block for j in got)  # causal: complete blocks before the query's own only


@pytest.mark.parametrize("length, dim, heads, kv_heads, block, top, contiguous", [
    (1, 40, 2, 2, 4, 2, True), (15, 64, 4, 2, 4, 2, False), (63, 40, 2, 1, 8, 3, True),
    (113, 100, 2, 2, 16, 4, False), (300, 128, 4, 1, 32, 2, True)])
def test_outputs_and_gradients_equal_the_dense_reference(length, dim, heads, kv_heads, block, top, contiguous):
    q, k, v = (t.requires_grad_() for t in make(2, heads, kv_heads, length, dim, contiguous=contiguous))
    scale = dim ** -0.5
    out = selected_block_attention(q, k, v, block, top)
    if length < block:  # no block to choose: zeros, with no graph to differentiate
        assert out.shape == q.shape and out.abs().max() == 0 and not out.requires_grad
        return
    indices, valid = select_blocks(q, k, block, top, scale)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    results = {}
    for name, dtype in (("ours", None), ("float64", torch.float64), ("torch", torch.float32)):
        o = out if dtype is None else dense_reference(q, k, v, block, indices, valid, scale, dtype=dtype)
        results[name] = [o.double(), *(g.double() for g in torch.autograd.grad((o * weights.to(o.dtype)).sum(),
                                                                                (q, k, v)))]
    for i, name in enumerate(("output", "dq", "dk", "dv")):
        ours = (results["ours"][i] - results["float64"][i]).abs().max()
        torch_error = (results["torch"][i] - results["float64"][i]).abs().max()
        assert ours <= 2 * torch_error + 1e-6, (name, float(ours), float(torch_error))
    assert out[:, :, :block].abs().max() == 0  # the first block has nothing earlier to read


def test_a_planted_key_is_found_from_far_away():
    """One key that matches every query of the last block, 20 blocks back: its block is chosen and read."""
    q, k, v = make(1, 2, 2, 24 * 8, 16, seed=3)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(9)), dim=0)
    q, k, v = q * 0.1, k * 0.1, v.clone()
    q[:, :, -8:] = 6 * direction
    k[:, :, 3 * 8 + 5] = 6 * direction  # q . k * scale = 9 there, about 0 elsewhere
    v[:, :, 3 * 8 + 5] = 7.0
    indices, valid = select_blocks(q, k, 8, 2, 0.25)
    assert (indices[:, :, -8:] == 3).any(-1).all() and valid[:, :, -8:].all()
    out = selected_block_attention(q, k, v, 8, 2, scale=0.25)
    assert (out[:, :, -8:] - 7.0).abs().max() < 0.5


def test_padded_keys_are_never_read():
    q, k, v = make(2, 2, 1, 40, 16, seed=4)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[0, 8:16] = False  # a whole block of padding: never chosen
    key_mask[1, 3] = False
    out = selected_block_attention(q, k, v, 8, 3, key_mask=key_mask)
    k2, v2 = k.clone(), v.clone()
    k2[~key_mask[:, None, :].expand_as(k2[..., 0])] = 1e4
    v2[~key_mask[:, None, :].expand_as(v2[..., 0])] = float("nan")
    torch.testing.assert_close(selected_block_attention(q, k2, v2, 8, 3, key_mask=key_mask), out, rtol=0, atol=0)
    indices, valid = select_blocks(q, k, 8, 3, 0.25, key_mask)
    assert not ((indices[0] == 1) & valid[0]).any()  # the padding-only block
    expected = dense_reference(q, k, v, 8, indices, valid, 0.25, key_mask)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)  # float32 against float64


def test_bounds_cover_every_key_of_the_block():
    _, k, _ = make(1, 1, 2, 33, 8)
    kmax, kmin = block_key_bounds(k, 8)
    assert kmax.shape == (1, 2, 4, 8)
    blocks = k[:, :, :32].reshape(1, 2, 4, 8, 8)
    assert (blocks <= kmax[:, :, :, None]).all() and (blocks >= kmin[:, :, :, None]).all()


@pytest.mark.parametrize("change, error, match", [
    ({"q": torch.zeros(2, 4, 8)}, ValueError, r"q must be 4-D \(batch, heads, seq, head_dim\), got shape \(2, 4, 8\)"),
    ({"k": torch.zeros(1, 2, 9, 16), "v": torch.zeros(1, 2, 9, 16)}, ValueError,
     r"q and k must hold the same positions \(self-attention\), got Tq=8 and Tk=9"),
    ({"q": torch.zeros(1, 3, 8, 16)}, ValueError, r"k has 2 heads, which does not divide q's 3 heads"),
    ({"v": torch.zeros(1, 2, 8, 16, dtype=torch.float64)}, TypeError, "v must have dtype in"),
    ({"block_size": 0}, ValueError, "block_size must be an int >= 1, got 0"),
    ({"top_k": 2.0}, ValueError, "top_k must be an int >= 1, got 2.0"),
    ({"key_mask": torch.ones(1, 8)}, TypeError, "key_mask must be a bool tensor, got dtype torch.float32"),
    ({"key_mask": torch.ones(1, 9, dtype=torch.bool)}, ValueError,
     r"key_mask must have shape \(1, 8\) \(batch, Tk\), got \(1, 9\)"),
])
def test_bad_input_names_the_argument(change, error, match):
    args = {"q": torch.zeros(1, 2, 8, 16), "k": torch.zeros(1, 2, 8, 16), "v": torch.zeros(1, 2, 8, 16),
            "block_size": 4, "top_k": 2, "key_mask": None}
    args.update(change)
    with pytest.raises(error, match=match):
        selected_block_attention(args["q"], args["k"], args["v"], args["block_size"], args["top_k"],
                                 key_mask=args["key_mask"])


def test_chunked_equals_one_chunk(monkeypatch):
    """Scoring and attending a few queries at a time (the chunks that bound memory at long T) changes nothing, with
    gradients through the checkpointed chunks."""
    from hybridrag.ops import block_selection

    q, k, v = (t.requires_grad_() for t in make(1, 4, 2, 90, 16, seed=6))
    key_mask = torch.ones(1, 90, dtype=torch.bool)
    key_mask[0, 20:23] = False
    results = []
    for selection_chunk, attention_chunk in ((1024, 512), (7, 11)):
        monkeypatch.setattr(block_selection, "SELECTION_CHUNK", selection_chunk)
        monkeypatch.setattr(block_selection, "ATTENTION_CHUNK", attention_chunk)
        out = selected_block_attention(q, k, v, 8, 3, key_mask=key_mask)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for whole, chunked in zip(*results):
        torch.testing.assert_close(chunked, whole)  # the same choices; sums in another order
