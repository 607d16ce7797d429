"""DocumentGenerator: a masked diffusion LM over the corpus' own words, conditioned on a retrieval encoder. Training
windows and vocabulary, generation (lengths, seeds, temperature), the checkpoint round trip, and refusals."""
import pytest
import torch
from pydoc_data.topics import topics

from hybridrag.diffusion import DocumentGenerator
from hybridrag.diffusion.documents import UNKNOWN, join_words, split_words
from hybridrag.retrieval.encoder import HashingEncoder

TEXTS = [topics[name] for name in ("assert", "for", "while", "pass", "if", "try")]
LENGTH = 24


@pytest.fixture(scope="module")
def encoder():
    return HashingEncoder(128)


@pytest.fixture(scope="module")
def generator(encoder):
    return DocumentGenerator.train(TEXTS, encoder, length=LENGTH, steps=40, hidden_dim=32, num_layers=1,
                                   num_heads=2, sampling_steps=8, progress=False)


def test_words_split_and_join():
    words = split_words("The `assert` statement: it raises AssertionError (when false).")
    assert words == ["the", "`", "assert", "`", "statement", ":", "it", "raises", "assertionerror", "(", "when",
                     "false", ")", "."]
    assert join_words(["it", "raises", "x", ",", "then", "stops", "."]) == "it raises x, then stops."


def test_the_vocabulary_is_the_corpus_words(generator):
    corpus = {word for text in TEXTS for word in split_words(text)}
    assert generator.vocabulary[0] == UNKNOWN
    assert set(generator.vocabulary[1:]) <= corpus
    assert generator.model.config.vocab_size == len(generator.vocabulary)
    assert generator.model.config.condition_dim == 128 and generator.length == LENGTH


def test_generated_passages_use_corpus_words_and_follow_the_seed(generator):
    corpus = {word for text in TEXTS for word in split_words(text)}
    texts = generator.generate("what does assert raise?", num_samples=3, seed=1)
    assert len(texts) == 3 and len(set(texts)) == 3  # each row its own draw
    for text in texts:
        words = split_words(text)
        assert 0 < len(words) <= LENGTH and set(words) <= corpus
    assert generator.generate("what does assert raise?", num_samples=3, seed=1) == texts
    greedy = generator.generate("what does assert raise?", num_samples=2, temperature=0, seed=2)
    assert greedy == generator.generate("what does assert raise?", num_samples=2, temperature=0, seed=2)


def test_the_checkpoint_round_trips_and_names_its_encoder(generator, encoder, tmp_path):
    path = generator.save(tmp_path / "generator.pt")
    again = DocumentGenerator.load(path, encoder)
    assert again.vocabulary == generator.vocabulary and again.length == LENGTH
    for name, value in generator.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name
    assert again.generate("loops", 2, seed=3) == generator.generate("loops", 2, seed=3)
    with pytest.raises(ValueError, match="trained with encoder 'hashing-128', not 'hashing-64'"):
        DocumentGenerator.load(path, HashingEncoder(64))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="damaged.pt"):
        DocumentGenerator.load(damaged, encoder)
    with pytest.raises(FileNotFoundError, match="no DocumentGenerator checkpoint"):
        DocumentGenerator.load(tmp_path / "missing.pt", encoder)


@pytest.mark.parametrize("texts, error, match", [
    ([], ValueError, "non-empty list"), ("one text", ValueError, "non-empty list"),
    (["too short"], ValueError, "no text has 24 words"), ([3], TypeError, r"texts\[0\] must be a str")])
def test_training_refuses_what_it_cannot_learn_from(encoder, texts, error, match):
    with pytest.raises(error, match=match):
        DocumentGenerator.train(texts, encoder, length=LENGTH, steps=1, progress=False)


def test_generation_refuses_bad_arguments(generator):
    with pytest.raises(ValueError, match="condition must be a non-empty str"):
        generator.generate("  ")
    with pytest.raises(ValueError, match="num_samples"):
        generator.generate("loops", num_samples=0)
    with pytest.raises(ValueError, match="temperature"):
        generator.generate("loops", temperature=-1.0)
    with pytest.raises(TypeError, match="retrieval encoder"):
        DocumentGenerator(generator.model, generator.vocabulary, object(), LENGTH)
