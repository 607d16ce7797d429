"""hybridrag.nn.lora: LoRA over nn.Linear and Int8Linear bases: identity at start, only adapters train, merge,
state round trip, bad input."""
import copy

import pytest
import torch
from torch import nn

from hybridrag.nn import Int8Linear, quantize_model
from hybridrag.nn.lora import (LoRALinear, apply_lora, load_lora_state_dict, lora_modules, lora_state_dict,
                                  merge_lora, set_lora_enabled)


def _ids():
    return torch.randint(0, 97, (2, 11))


def _bump(model):
    """Give every adapter a non-zero B, so it changes the output."""
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_b.normal_(0, 0.05)


def test_starts_as_identity_and_only_adapters_train(tiny_llama, one_thread):
    model = copy.deepcopy(tiny_llama)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    names = apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    assert len(names) == 6 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in names for k in ("lora_a", "lora_b")}
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_merge_and_state_round_trip(tiny_llama, one_thread):
    model = copy.deepcopy(tiny_llama)
    apply_lora(model, rank=4, alpha=8, layers=[1])
    assert all(".layers.1." in n for n in lora_modules(model))
    _bump(model)
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids).logits
        set_lora_enabled(model, False)
        assert not torch.allclose(model(ids).logits, adapted)
        set_lora_enabled(model, True)
    state = lora_state_dict(model)
    other = copy.deepcopy(tiny_llama)
    apply_lora(other, rank=4, alpha=8, layers=[1])
    load_lora_state_dict(other, state)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, adapted)
        merge_lora(other)
        assert not lora_modules(other) and isinstance(other.model.layers[1].self_attn.q_proj, nn.Linear)
        torch.testing.assert_close(other(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    wrong = copy.deepcopy(tiny_llama)
    apply_lora(wrong, rank=2, alpha=8, layers=[1])
    with pytest.raises(ValueError, match="adapter shapes differ"):
        load_lora_state_dict(wrong, state)


def test_int8_base(tiny_llama, one_thread):
    model = copy.deepcopy(tiny_llama)
    quantize_model(model, mode="w8a16", skip=("lm_head",))
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "o_proj"))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, Int8Linear)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(m.lora_a.grad is not None for m in lora_modules(model).values())
    _bump(model)
    with torch.no_grad():
        adapted = model(ids).logits
        merge_lora(model)
        assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)  # requantized
        torch.testing.assert_close(model(ids).logits, adapted, atol=0.05, rtol=0)


def test_bad_input(tiny_llama):
    with pytest.raises(TypeError, match="base must be a linear-like module"):
        LoRALinear(nn.ReLU())
    with pytest.raises(ValueError, match="rank must be an int > 0"):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        LoRALinear(nn.Linear(4, 4), dropout=1.0)
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match="no module of LlamaForCausalLM matches targets"):
        apply_lora(model, targets=("qkv",))
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        lora_state_dict(model)
    apply_lora(model, targets=("q_proj",))
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        apply_lora(model, targets=("v_proj",))
