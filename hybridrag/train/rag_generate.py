"""Answers of a fine-tuned (or base) LM to RAG prompts, greedy or sampled: the decoding side of rag-finetune."""
import torch

from ..system.generation import stream_generate

__all__ = ["generate_ids", "end_of_turn_ids"]


def end_of_turn_ids(model, tokenizer):
    """The token ids that end an answer: the model's eos ids and the tokenizer's "<|im_end|>" when it has one."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
            break
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if end is not None:
        ids.add(end)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids, *, max_new_tokens=24, temperature=0.0, seed=0):
    """(the sampled token ids, the end token included when one came; the answer text without it) for one prompt
    (a list of ids)."""
    eos = end_of_turn_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        tokens = [t.id for t in stream_generate(model, torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                                temperature=temperature, seed=seed, eos_token_ids=eos)]
    finally:
        model.train(was_training)
    answer = tokens[:-1] if tokens and tokens[-1] in eos else tokens
    return tokens, tokenizer.decode(answer, skip_special_tokens=True).strip()
