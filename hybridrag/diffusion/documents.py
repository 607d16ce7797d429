"""DocumentGenerator: synthetic passages for a knowledge base from a masked diffusion language model conditioned on
the knowledge base's own encoder.

    generator = DocumentGenerator.train(texts, encoder, length=48, steps=600)   # texts: the corpus' passages
    generator.save("generator.pt")
    generator = DocumentGenerator.load("generator.pt", encoder)                 # the same encoder (by name)
    samples = generator.generate("how does a for loop end?", num_samples=4)     # -> [str]

Training: every passage is cut into windows of `length` words; each window is a target and its embedding by
`encoder` (the retrieval encoder: .name, .dimension, .encode(list) -> (N, d)) is its condition vector, so the model
learns text whose embedding lies near the condition's. Generating embeds the condition text with the same encoder
and samples each row with its own draw (temperature > 0), so the rows differ, fixing positions in a random order
(MaskedDiffusionLM.generate(order="random")).

Words: the generator carries its own vocabulary, the words and punctuation marks of the training corpus
(lower-cased, the `max_vocabulary` - 1 most frequent; the rest are [UNK] in training and left out of generated
text), so it depends on no tokenizer; decoding joins the words with spaces and closes them up before punctuation.

The checkpoint (one checksummed file, hybridrag.checked_file) holds the model's config and weights, the
vocabulary, the window length and the encoder's name; loading it with another encoder is a ValueError.
"""
import collections
import re
from pathlib import Path

import numpy as np
import torch

from ..checked_file import read_checked, state_mismatches, write_checked
from ..nn.common import _check_positive_int
from .config import TextDiffusionConfig, _check_number
from .text import MaskedDiffusionLM, train_text_diffusion

__all__ = ["DocumentGenerator", "split_words", "join_words"]

FORMAT = 1
UNKNOWN = "[UNK]"
_WORD = re.compile(r"\w+|[^\w\s]")
_CLOSE_UP = re.compile(r" ([.,;:!?)\]}])")


def split_words(text):
    """Lower-cased words and punctuation marks of `text`, in order."""
    return _WORD.findall(text.lower())


def join_words(words):
    """Words back into text: spaces between them, none before closing punctuation."""
    return _CLOSE_UP.sub(r"\1", " ".join(words))


def _check_encoder(encoder):
    if not (isinstance(getattr(encoder, "name", None), str) and isinstance(getattr(encoder, "dimension", None), int)
            and callable(getattr(encoder, "encode", None))):
        raise TypeError(f"encoder must be a retrieval encoder (.name, .dimension, .encode), got "
                        f"{type(encoder).__name__}")
    return encoder


def _embed(encoder, texts):
    vectors = np.asarray(encoder.encode(list(texts)), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(vectors))


class DocumentGenerator:
    """A trained MaskedDiffusionLM with its word vocabulary and condition encoder (see the module docstring).

    Args:
        model: a MaskedDiffusionLM whose config has vocab_size = len(vocabulary), condition_dim = the encoder's
            dimension and max_length >= length + 1.
        vocabulary: the words, index = token id; vocabulary[0] is [UNK].
        encoder: the retrieval encoder whose embeddings condition the model.
        length: words per generated passage.
    """

    def __init__(self, model, vocabulary, encoder, length):
        if not isinstance(model, MaskedDiffusionLM):
            raise TypeError(f"model must be a MaskedDiffusionLM, got {type(model).__name__}")
        self.encoder = _check_encoder(encoder)
        vocabulary = list(vocabulary)
        if not vocabulary or vocabulary[0] != UNKNOWN or not all(isinstance(w, str) for w in vocabulary):
            raise ValueError(f"vocabulary must be a list of str starting with {UNKNOWN!r}")
        config = model.config
        if config.vocab_size != len(vocabulary):
            raise ValueError(f"the model has vocab_size {config.vocab_size} but the vocabulary {len(vocabulary)} "
                             "words")
        if config.condition_dim != encoder.dimension:
            raise ValueError(f"the model's condition_dim is {config.condition_dim} but encoder {encoder.name!r} has "
                             f"dimension {encoder.dimension}")
        _check_positive_int("length", length)
        if length + 1 > config.max_length:
            raise ValueError(f"length {length} + 1 condition position exceeds the model's max_length "
                             f"{config.max_length}")
        self.model, self.vocabulary, self.length = model, vocabulary, length

    def __repr__(self):
        return (f"DocumentGenerator(words={len(self.vocabulary)}, length={self.length}, "
                f"encoder={self.encoder.name!r})")

    # ---------------------------------------------------------------- training

    @classmethod
    def train(cls, texts, encoder, *, length=48, steps=600, batch_size=32, lr=1e-3, max_vocabulary=8000,
              hidden_dim=128, num_layers=2, num_heads=4, sampling_steps=16, seed=0, progress=True):
        """Train a generator on `texts` (the corpus' passages, a non-empty list of str) conditioned on `encoder`.

        Every text gives its consecutive windows of `length` words (a shorter last piece is dropped; a text shorter
        than `length` gives none); ValueError when no window comes out. Memory and time: the windows' embeddings
        (N x d floats, one encoder pass), and `steps` AdamW steps of MaskedDiffusionLM on batch_size x (length + 1)
        positions.
        """
        encoder = _check_encoder(encoder)
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError(f"texts must be a non-empty list of str, got {type(texts).__name__}")
        _check_positive_int("length", length)
        _check_positive_int("max_vocabulary", max_vocabulary)
        windows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            words = split_words(text)
            windows += [words[start:start + length] for start in range(0, len(words) - length + 1, length)]
        if not windows:
            raise ValueError(f"no text has {length} words: there is nothing to train on (give longer texts or a "
                             "smaller length)")
        counts = collections.Counter(word for window in windows for word in window)
        vocabulary = [UNKNOWN] + [word for word, _ in counts.most_common(max_vocabulary - 1)]
        ids = {word: i for i, word in enumerate(vocabulary)}
        targets = torch.tensor([[ids.get(word, 0) for word in window] for window in windows], dtype=torch.long)
        conditions = _embed(encoder, [join_words(window) for window in windows])
        config = TextDiffusionConfig(vocab_size=len(vocabulary), max_length=length + 1, hidden_dim=hidden_dim,
                                     num_layers=num_layers, num_heads=num_heads, condition_dim=encoder.dimension,
                                     sampling_steps=sampling_steps)
        torch.manual_seed(seed)
        model = MaskedDiffusionLM(config)
        train_text_diffusion(model, targets, condition=conditions, steps=steps, batch_size=batch_size, lr=lr,
                             seed=seed, progress=progress)
        return cls(model, vocabulary, encoder, length)

    # ---------------------------------------------------------------- generating

    def generate(self, condition, num_samples=4, num_steps=None, *, temperature=1.0, seed=0):
        """`num_samples` passages (str) for the condition text, each `length` words ([UNK]s left out).

        num_steps: unmasking steps (default the model's sampling_steps); temperature: > 0 samples each word, 0
        takes the most likely one at each position (rows still differ: each fixes its positions in its own random
        order); `seed` makes the draws repeatable. Time: up to num_steps forward passes over
        num_samples x (length + 1) positions, plus one encoder call.
        """
        if not isinstance(condition, str) or not condition.strip():
            raise ValueError(f"condition must be a non-empty str, got {condition!r}")
        _check_positive_int("num_samples", num_samples)
        temperature = _check_number("temperature", temperature, 0.0)
        vector = _embed(self.encoder, [condition]).expand(num_samples, -1)
        generator = torch.Generator().manual_seed(seed)
        ids = self.model.generate(vector, self.length, num_steps, temperature=temperature, order="random",
                                  generator=generator)
        return [join_words(self.vocabulary[i] for i in row if i) for row in ids.tolist()]  # 0: [UNK]

    # ---------------------------------------------------------------- files

    def save(self, path):
        """One checksummed file (written atomically): the model's config and weights, the vocabulary, the length
        and the encoder's name. Returns the path."""
        state = {"format": FORMAT, "config": self.model.config.to_dict(), "state_dict": self.model.state_dict(),
                 "vocabulary": self.vocabulary, "length": self.length, "encoder": self.encoder.name}
        return write_checked(path, "DocumentGenerator", FORMAT, state)

    @classmethod
    def load(cls, path, encoder):
        """The generator saved at `path`, conditioned on `encoder`, which must be the one it was trained with (its
        name): ValueError naming both otherwise, FileNotFoundError for a missing file."""
        encoder = _check_encoder(encoder)
        path = Path(path)
        state = read_checked(path, "DocumentGenerator", FORMAT,
                             ("format", "config", "state_dict", "vocabulary", "length", "encoder"))
        if state["encoder"] != encoder.name:
            raise ValueError(f"{path} was trained with encoder {state['encoder']!r}, not {encoder.name!r}: its "
                             "condition vectors live in that encoder's space; train one for this knowledge base")
        model = MaskedDiffusionLM(TextDiffusionConfig.from_any(state["config"]))
        parts = state_mismatches(state["state_dict"], model.state_dict())
        if parts:
            raise ValueError(f"{path}: the checkpoint's weights do not match its config: {'; '.join(parts)}")
        model.load_state_dict(state["state_dict"])
        model.eval()
        return cls(model, state["vocabulary"], encoder, state["length"])
