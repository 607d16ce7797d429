"""Streamed decoding with timings: a manual KV-cache loop over a transformers causal LM.

    from hybridrag.system.generation import GenerationStats, stream_generate, generate_text, stream_to
    stats = GenerationStats()
    for token in stream_generate(lm.model, ids, tokenizer=lm.tokenizer, stats=stats):  # StreamedToken(id, text)
        print(token.text, end="", flush=True)
    text, stats = generate_text(lm, "What is the capital of France?")   # a LanguageModel: chat template applied

One prefill forward of the prompt, then one forward per new token with the cache; greedy at temperature 0, else
top-p sampling from a seeded torch.Generator (the same seed gives the same tokens on one machine). Without a
given cache the steps append to a GrowingCache sized for the prompt and max_new_tokens (no copy of the cache a
step).
"""
import inspect
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

__all__ = ["GenerationStats", "StreamedToken", "stream_generate", "generate_text", "stream_to"]


@dataclass
class GenerationStats:
    """Timings of one generation, in seconds, filled in by stream_generate as it runs.

    prefill_s: the forward over the prompt. first_token_s: from the first request for a token (the first next())
    to the first token, prefill and sampling included. decode_s: the forwards and sampling of every later token.
    prompt_tokens: tokens in input_ids (a given cache's earlier tokens not counted). new_tokens: tokens yielded.
    The time the consumer spends between tokens is not counted anywhere.
    """
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0

    @property
    def tokens_per_second(self):
        """Decoding speed: the tokens after the first over decode_s (0.0 with fewer than two tokens)."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def as_dict(self):
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


class StreamedToken(NamedTuple):
    """One generated token: its id and the text it adds (None without a tokenizer). Joined, the texts are the
    decoded answer with special tokens left out; a piece can be "" while a multi-byte character is incomplete."""
    id: int
    text: str | None


class _IncrementalDecoder:
    """Text pieces of a growing token list, so that characters split over tokens come out whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def add(self, token_id, last):
        """The text token_id adds; held back ("") while it ends in an incomplete character, unless last."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and not last:
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def _check_input_ids(input_ids):
    """(T,) or (1, T) integer tensor with T >= 1 -> (1, T)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 or int32 tensor of token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (T,) or (1, T) (one sequence), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    return input_ids.long()


def _check_options(max_new_tokens, temperature, top_p, seed):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def _eos_ids(model, eos_token_ids):
    """A set of ints: eos_token_ids as given (an int or ints; empty: never stop early), else the model's."""
    if eos_token_ids is None:
        for source in (getattr(model, "generation_config", None), model.config):
            eos_token_ids = getattr(source, "eos_token_id", None)
            if eos_token_ids is not None:
                break
        else:
            return set()
    if isinstance(eos_token_ids, int):
        return {eos_token_ids}
    ids = set(eos_token_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_token_ids must be an int or a collection of ints, got {eos_token_ids!r}")
    return ids


def _context_length(model):
    return getattr(model.config, "max_position_embeddings", None)


def _check_fits(model, past_length, prompt_length, max_new_tokens):
    limit = _context_length(model)
    if limit is not None and past_length + prompt_length + max_new_tokens > limit:
        cached = f"{past_length} cached + " if past_length else ""
        raise ValueError(f"the prompt ({cached}{prompt_length} tokens) and max_new_tokens ({max_new_tokens}) make "
                         f"{past_length + prompt_length + max_new_tokens} positions, over the model's context length "
                         f"of {limit}; shorten the prompt or lower max_new_tokens")


def _forward_keywords(model):
    """The forward's names for the cache ("cache" from transformers 5.24 on, "past_key_values" before) and whether
    it takes logits_to_keep (only the last position's logits are needed)."""
    names = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in names else "past_key_values"), "logits_to_keep" in names


def _new_cache(model, capacity):
    """A GrowingCache with room for `capacity` positions (steps append in place), or for a model with
    sliding-window or other layer kinds, transformers' DynamicCache of those kinds."""
    from transformers import DynamicCache

    from .growing_cache import GrowingCache

    cache = GrowingCache.for_model(model.config, capacity)
    return cache if cache is not None else DynamicCache(config=model.config)


def _sample(logits, temperature, top_p, generator):
    """logits (V,) -> a token id: argmax at temperature 0, else from the top-p nucleus of softmax(logits / T)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # the most likely token is always kept
        sorted_probs[outside] = 0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _unwrap(model, tokenizer):
    """A LanguageModel -> (its transformers model, its tokenizer unless one is given)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module) and hasattr(model, "tokenizer"):
        return inner, tokenizer if tokenizer is not None else model.tokenizer
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers causal LM or a LanguageModel, got {type(model).__name__}")
    return model, tokenizer


def stream_generate(model, input_ids, *, past_key_values=None, max_new_tokens=128, temperature=0.0, top_p=1.0,
                    seed=0, eos_token_ids=None, stats=None, tokenizer=None):
    """Generate one sequence token by token, yielding each as it comes.

    Args:
        model: a transformers causal LM (or a LanguageModel, whose tokenizer is then the default).
        input_ids: LongTensor (1, T) or (T,), T >= 1: the prompt, or the tokens after those in past_key_values.
        past_key_values: None, or a transformers Cache holding earlier tokens; the new positions follow its length.
            It is extended in place with input_ids and every yielded token but the last.
        max_new_tokens: the most tokens to yield (>= 1); past + T + max_new_tokens must fit the context length.
        temperature: 0 for greedy decoding, else sampling from softmax(logits / temperature).
        top_p: in (0, 1]: sample from the smallest set of most likely tokens whose probability reaches top_p.
        seed: seeds the sampling's torch.Generator.
        eos_token_ids: an int or ints that end the answer (the eos token is yielded, then the stream stops);
            None: the model's generation_config.eos_token_id; () never stops early.
        stats: a GenerationStats to fill in as tokens come (None: not recorded).
        tokenizer: decodes each token's text piece; None: pieces are None.

    Returns:
        An iterator of StreamedToken(id, text). The arguments are checked at the call (ValueError / TypeError
        naming the argument); the model runs as the iterator is consumed.
    """
    model, tokenizer = _unwrap(model, tokenizer)
    input_ids = _check_input_ids(input_ids)
    _check_options(max_new_tokens, temperature, top_p, seed)
    eos = _eos_ids(model, eos_token_ids)
    past_length = 0 if past_key_values is None else past_key_values.get_seq_length()
    _check_fits(model, past_length, input_ids.shape[1], max_new_tokens)
    device = next(model.parameters()).device
    return _stream(model, input_ids.to(device), past_key_values, past_length, max_new_tokens, temperature, top_p,
                   seed, eos, stats if stats is not None else GenerationStats(), tokenizer)


def _stream(model, input_ids, cache, past_length, max_new_tokens, temperature, top_p, seed, eos, stats, tokenizer):
    start = time.perf_counter()
    cache_name, takes_logits_to_keep = _forward_keywords(model)
    cache = cache if cache is not None else _new_cache(model, input_ids.shape[1] + max_new_tokens)
    extra = {"logits_to_keep": 1} if takes_logits_to_keep else {}
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    decoder = _IncrementalDecoder(tokenizer) if tokenizer is not None else None
    stats.prompt_tokens, stats.new_tokens = input_ids.shape[1], 0
    position = past_length
    step_input = input_ids
    for index in range(max_new_tokens):
        step_start = time.perf_counter()
        length = step_input.shape[1]
        positions = torch.arange(position, position + length, device=input_ids.device)[None]
        with torch.no_grad():
            logits = model(input_ids=step_input, position_ids=positions, use_cache=True, **{cache_name: cache},
                           **extra).logits[0, -1]
        if index == 0:
            stats.prefill_s = time.perf_counter() - step_start
        token = _sample(logits, temperature, top_p, generator)
        now = time.perf_counter()
        if index == 0:
            stats.first_token_s = now - start
        else:
            stats.decode_s += now - step_start
        stats.new_tokens += 1
        last = token in eos or index == max_new_tokens - 1
        yield StreamedToken(token, decoder.add(token, last) if decoder is not None else None)
        if last:
            return
        position += length
        step_input = torch.tensor([[token]], device=input_ids.device)


def generate_text(language_model, prompt_or_ids, *, system=None, **options):
    """Generate and join: (answer text, GenerationStats).

    language_model: a LanguageModel. prompt_or_ids: a str is a user message, put through the chat template with
    `system` (None: no system message); a LongTensor (1, T) is used as it is. options: stream_generate's.
    """
    if "stats" in options or "tokenizer" in options:
        raise TypeError("generate_text makes its own stats and uses language_model.tokenizer; "
                        "call stream_generate for those options")
    if isinstance(prompt_or_ids, str):
        input_ids = language_model.encode(language_model.chat_prompt(system or "", prompt_or_ids))
    elif isinstance(prompt_or_ids, torch.Tensor):
        if system is not None:
            raise ValueError("system applies to a str prompt; token ids are used as they are")
        input_ids = prompt_or_ids
    else:
        raise TypeError(f"prompt_or_ids must be a str or a LongTensor (1, T), got {type(prompt_or_ids).__name__}")
    stats = GenerationStats()
    stream = stream_generate(language_model.model, input_ids, tokenizer=language_model.tokenizer, stats=stats,
                             **options)
    return "".join(token.text for token in stream), stats


def stream_to(stream, out=None):
    """Write each token's text to out (default sys.stdout) as it comes, flushing; returns the joined text."""
    out = out if out is not None else sys.stdout
    pieces = []
    for token in stream:
        piece = token.text if isinstance(token, StreamedToken) else token
        if piece is None:
            raise ValueError("the stream carries no text: pass tokenizer= to stream_generate")
        out.write(piece)
        out.flush()
        pieces.append(piece)
    return "".join(pieces)
