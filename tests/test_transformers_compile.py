"""transformers' recipe for fast generation (a static cache and a compiled forward) with attn_implementation=
"hybridrag": no graph break under fullgraph=True, no recompilation across decode steps or prompt lengths, and the
compiled decode equal to eager."""
import pytest
import torch

pytest.importorskip("transformers", minversion="5.4")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from transformers import StaticCache  # noqa: E402

from test_transformers_integration import build_pair, make_batch  # noqa: E402

STEPS = 20
CACHE_SLOTS = 40  # one static cache size for every prompt: a cache of another size is another graph


def _decode(forward, model, ids, mask, steps=STEPS, on_step=None):
    """Greedy decoding against a static cache: the prompt through the model itself, each step through `forward`.
    Returns the new tokens (B, steps + 1) and the steps' logits (B, steps, V)."""
    cache = StaticCache(config=model.config, max_cache_len=CACHE_SLOTS)
    with torch.no_grad():
        token = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens, logits = [token], []
        for step in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = forward(token, attention_mask=mask, cache=cache, use_cache=True,
                          position_ids=mask.sum(dim=1, keepdim=True) - 1)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            logits.append(out.logits)
            if on_step is not None:
                on_step(step)
    return torch.cat(tokens, dim=1), torch.cat(logits, dim=1)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_compiled_static_cache_decode_equals_eager_without_recompiling(name):
    eager, hybrid = build_pair(name)
    counter = CompileCounterWithBackend("aot_eager")  # dynamo + AOT autograd with the ops' fake implementations
    compiled = torch.compile(hybrid.forward, fullgraph=True, backend=counter)  # any graph break raises
    counts = []
    ids, mask = make_batch("left", length=10)
    tokens, logits = _decode(compiled, hybrid, ids, mask, on_step=lambda step: counts.append(counter.frame_count))
    # the first two steps compile (the mask's length is specialised, then made dynamic); then nothing recompiles
    assert counts[1] <= 2 and counts[-1] == counts[1], counts
    expected_tokens, expected_logits = _decode(eager.forward, eager, ids, mask)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    # another prompt length and another padding: the same graphs serve
    ids, mask = make_batch("left", length=7)
    _decode(compiled, hybrid, ids, mask)
    assert counter.frame_count == counts[-1]
