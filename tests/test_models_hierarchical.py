"""HierarchicalHybridRAG and HierarchicalConfig: shapes, causality, loss, gradients, odd lengths, checkpointing,
int8, bad input, and a tiny overfitting run."""
import pytest
import torch
import torch.nn.functional as F

from hybridrag.models import HierarchicalConfig, HierarchicalHybridRAG
from hybridrag.nn import Int8Linear

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 32


def tiny_config(**kwargs):
    config = {"vocab_size": VOCAB, "hidden_size": 32, "num_heads": 2, "segment_length": 8, "window_size": 4,
              "num_landmark_tokens": 2, "cross_window": 4, "intermediate_size": 48, "num_local_layers": 1,
              "num_cross_layers": 1, "num_synthesis_layers": 1}
    config.update(kwargs)
    return HierarchicalConfig(**config)


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return HierarchicalHybridRAG(tiny_config(**kwargs))


def ids(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def open_gates(model):
    """The retrieval gate starts at 0 (the layer is the identity); open it so everything behind it gets gradients."""
    with torch.no_grad():
        model.retrieval_attention.gate.fill_(0.5)
        model.retrieval_attention.relevance_scorer.weight.normal_(std=0.1)


@pytest.mark.parametrize("length", [1, 3, 8, 19])
def test_shapes_and_loss_equal_manual_cross_entropy(length):
    model = tiny_model()
    x = ids(2, length)
    labels = x.clone()
    labels[0, -1] = -100
    out = model(x)
    assert set(out) == {"logits"} and out["logits"].shape == (2, length, VOCAB)
    if length == 1:  # no next token: a loss would be NaN
        with pytest.raises(ValueError, match="labels has no target"):
            model(x, labels=labels)
        return
    out = model(x, labels=labels)
    logits = out["logits"]
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["loss"], manual)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("local_attention, selected_blocks", [("sliding", 0), ("hybrid", 0), ("sliding", 2)])
def test_causal_across_segments(local_attention, selected_blocks):
    extra = {"num_memory_tokens": 2} if local_attention == "hybrid" else {}
    model = tiny_model(local_attention=local_attention, retrieval=True, selected_blocks=selected_blocks,
                       **extra).eval()
    open_gates(model)
    x, passages = ids(2, 29), ids(2, 6, seed=3).view(2, 2, 3)
    with torch.no_grad():
        base = model(x, retrieved=passages)["logits"]
        for t in (0, 7, 8, 13, 28):  # segment starts, ends, a landmark (stride 4: 3, 7, 11, ...) and the last token
            changed = x.clone()
            changed[:, t] = (changed[:, t] + 1) % VOCAB
            logits = model(changed, retrieved=passages)["logits"]
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
            assert (logits[:, t:] - base[:, t:]).abs().amax() > 0
    # a fact at token 2 (segment 0) reaches the last token (segment 3) through the landmarks
    assert (model(changed_at(x, 2), retrieved=passages)["logits"][:, -1] - base[:, -1]).abs().amax() > 1e-6


def changed_at(x, t):
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    return changed


@pytest.mark.parametrize("selected_blocks", [0, 2])
def test_gradients_reach_every_parameter(selected_blocks):
    model = tiny_model(local_attention="hybrid", num_memory_tokens=2, retrieval=True, tie_word_embeddings=False,
                       selected_blocks=selected_blocks)
    open_gates(model)
    x = ids(2, 21)
    model(x, labels=x, retrieved=ids(2, 8, seed=5).view(2, 2, 4))["loss"].backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_stage_gates_start_closed_and_open_with_training():
    """At g = 0 the model is its embeddings into stage 3 (the stage 1 and 2 blocks change nothing and get no
    gradient); the gates get one, and once open the model is causal and every parameter gets a gradient."""
    model = tiny_model(stage_gates=True, selected_blocks=2)
    closed = tiny_model(stage_gates=True, selected_blocks=2, num_local_layers=0, num_cross_layers=0)
    closed.load_state_dict({k: v for k, v in model.state_dict().items()
                            if not k.startswith(("local_blocks", "cross_blocks"))})
    x = ids(2, 37)
    loss = model(x, labels=x)["loss"]
    assert torch.allclose(model(x)["logits"], closed(x)["logits"], atol=1e-6)
    loss.backward()
    assert model.local_gate.grad.abs() > 0 and model.cross_gate.grad.abs() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.local_blocks.parameters())
    with torch.no_grad():
        model.local_gate.fill_(0.5)
        model.cross_gate.fill_(0.5)
    model.zero_grad()
    model(x, labels=x)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.local_blocks.parameters())
    with torch.no_grad():
        base = model(x)["logits"]
        later = model(changed_at(x, 30))["logits"]
    # equal up to rounding: a block of queries gathers the union of its queries' selected blocks, so a later
    # token changes the order of the earlier queries' sums (also without gates: ~3e-8 here)
    torch.testing.assert_close(later[:, :30], base[:, :30], rtol=0, atol=1e-6)
    assert (later[:, 30:] - base[:, 30:]).abs().amax() > 1e-4


def test_padding_is_hidden():
    model = tiny_model().eval()
    x = ids(2, 19)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[:, 5] = 0  # a hole in the middle: no other token may read token 5
    with torch.no_grad():
        base = model(x, attention_mask=mask)["logits"]
        other = model(changed_at(x, 5), attention_mask=mask)["logits"]
        torch.testing.assert_close(torch.cat([other[:, :5], other[:, 6:]], 1),
                                   torch.cat([base[:, :5], base[:, 6:]], 1), rtol=0, atol=0)
        # an all-ones mask is the unmasked model
        torch.testing.assert_close(model(x, attention_mask=torch.ones_like(mask))["logits"], model(x)["logits"])


def test_gradient_checkpointing_same_loss_and_grads():
    x = ids(2, 19)
    results = []
    for flag in (False, True):
        model = tiny_model(retrieval=True)
        if flag:
            model.gradient_checkpointing_enable()  # the method HybridRAGTrainer calls
        assert model.config.gradient_checkpointing is flag
        open_gates(model)
        loss = model(x, labels=x, retrieved=ids(2, 6, seed=4).view(2, 2, 3))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_int8_quantized_runs_and_stays_close():
    model = tiny_model(retrieval=True).eval()
    open_gates(model)
    x, passages = ids(2, 19), ids(2, 6, seed=4).view(2, 2, 3)
    with torch.no_grad():
        base = model(x, retrieved=passages)["logits"]
        report = model.quantize()
        logits = model(x, retrieved=passages)["logits"]
    assert isinstance(model.local_blocks[0].mlp.up_proj, Int8Linear)
    assert isinstance(model.synthesis_blocks[0].attention.q_proj, Int8Linear)
    assert "lm_head" in report.skipped and "retrieval_attention.relevance_scorer" in report.skipped
    error = (logits - base).norm() / base.norm()
    assert error < 0.05, error


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(ids(2, 5).float()), TypeError, "input_ids must be an integer"),
    (lambda m: m(ids(2, 5)[0]), ValueError, r"input_ids must be \(B, T\)"),
    (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), ValueError, r"input_ids must be \(B, T\)"),
    (lambda m: m(ids(2, 5) + VOCAB), ValueError, r"input_ids must lie in \[0, 32\)"),
    (lambda m: m(ids(2, 5), attention_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "attention_mask must"),
    (lambda m: m(ids(2, 5), attention_mask=torch.full((2, 5), 2)), ValueError, "only 0 and 1"),
    (lambda m: m(ids(2, 5), attention_mask=torch.ones(2, 5)), TypeError, "attention_mask must be a bool"),
    (lambda m: m(ids(2, 5), labels=ids(2, 4)), ValueError, r"labels must have shape \(2, 5\)"),
    (lambda m: m(ids(2, 5), labels=torch.full((2, 5), -100)), ValueError, "labels has no target"),
    (lambda m: m(ids(2, 5), labels=torch.full((2, 5), -5)), ValueError, "labels must lie in"),
    (lambda m: m(ids(2, 5), retrieved_mask=torch.ones(2, 1, 3, dtype=torch.bool)), ValueError, "without retrieved"),
    (lambda m: m(ids(2, 5), retrieved=ids(2, 15).view(2, 5, 3)), ValueError, "more than max_retrieved=4"),
    (lambda m: m(ids(2, 5), retrieved=ids(1, 6).view(1, 2, 3)), ValueError, r"retrieved token ids must be \(2"),
    (lambda m: m(ids(2, 5), retrieved=torch.randn(2, 2, 3, 16)), ValueError, r"retrieved states must be"),
    (lambda m: m(ids(2, 5), retrieved=torch.randn(2, 2, 3, 32).double()), TypeError, "dtype torch.float64"),
    (lambda m: m(ids(2, 5), retrieved=ids(2, 6).view(2, 2, 3), retrieved_mask=torch.ones(2, 2, 3)), TypeError,
     "retrieved_mask must be a bool"),
    (lambda m: m([[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
])
def test_bad_inputs_raise_before_compute(call, error, match, monkeypatch):
    model = tiny_model(retrieval=True)
    monkeypatch.setattr(model.embed_tokens, "forward", lambda *a: pytest.fail("computed before the check"))
    with pytest.raises(error, match=match):
        call(model)


def test_retrieved_without_retrieval_layer():
    with pytest.raises(ValueError, match="config.retrieval=False"):
        tiny_model()(ids(2, 5), retrieved=ids(2, 6).view(2, 2, 3))


@pytest.mark.parametrize("field, value, error, match", [
    ("hidden_size", 0, ValueError, "hidden_size must be an int >= 1, got 0"),
    ("vocab_size", 3.0, TypeError, "vocab_size must be an int"),
    ("window_size", 9, ValueError, "window_size must be <= segment_length"),
    ("num_landmark_tokens", 3, ValueError, "num_landmark_tokens must divide segment_length"),
    ("num_kv_heads", 3, ValueError, "num_kv_heads must divide num_heads"),
    ("hidden_size", 24, ValueError, "head_dim must be an even int in"),
    ("local_attention", "dense", ValueError, "local_attention must be one of"),
    ("dropout", 1.0, ValueError, r"dropout must be in \[0.0, 1.0\)"),
    ("retrieval", 1, TypeError, "retrieval must be True or False"),
    ("num_memory_tokens", 2, ValueError, "num_memory_tokens needs local_attention='hybrid'"),
    ("backend", "gpu", ValueError, "backend must be one of"),
])
def test_config_errors_name_the_field(field, value, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**{field: value})


def test_config_round_trip_and_unknown_keys():
    config = tiny_config(retrieval=True)
    assert HierarchicalConfig.from_dict(config.to_dict()) == config
    assert config.landmark_stride == 4 and config.num_kv_heads == 2 and config.cross_landmark_stride == 2
    with pytest.raises(ValueError, match=r"unknown HierarchicalConfig field\(s\) \['windows'\]"):
        HierarchicalConfig.from_dict({**config.to_dict(), "windows": 3})
    model = HierarchicalHybridRAG(config.to_dict())
    assert model.config == config
    with pytest.raises(TypeError, match="config must be a HierarchicalConfig"):
        HierarchicalHybridRAG("config.json")


def test_overfits_a_tiny_batch():
    model = tiny_model(retrieval=True)
    x = ids(2, 20)
    passages = ids(2, 6, seed=7).view(2, 2, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(x, labels=x, retrieved=passages)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_backends_agree():
    """The model on the CPU tiled path and the interpreted Triton kernels equals the dense reference (loss, grads)."""
    x = ids(2, 19)
    results = {}
    for backend in ("reference", "cpu", "triton"):
        model = tiny_model(backend=backend)
        loss = model(x, labels=x)["loss"]
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    for backend in ("cpu", "triton"):
        torch.testing.assert_close(results[backend][0], results["reference"][0])
        for name, grad in results["reference"][1].items():
            torch.testing.assert_close(results[backend][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_selected_blocks_read_a_far_block_whole():
    """With selected_blocks, the synthesis layer is BlockSelectionAttention: its selected branch reads tokens of
    earlier blocks (not only their landmark), and the model stays causal and padding-blind (tests above)."""
    from hybridrag.models.blocks import BlockSelectionAttention

    model = tiny_model(selected_blocks=2, num_cross_layers=0)
    (layer,) = [block.attention for block in model.synthesis_blocks]
    assert isinstance(layer, BlockSelectionAttention) and layer.top_k == 2 and "top_k=2" in repr(layer)
    x = ids(2, 24)
    with torch.no_grad():
        base = model(x)["logits"]
        layer.selection_gate.bias.fill_(-1e4)  # the gate shut: only the landmark attention remains
        shut = model(x)["logits"]
    assert (shut[:, 8:] - base[:, 8:]).abs().amax() > 1e-6  # from the third block on, something was selected
    torch.testing.assert_close(shut[:, :4], base[:, :4], rtol=0, atol=1e-6)  # the first block has nothing earlier
