"""hybridrag.encoders.train, its command line and the knowledge-base adapter: distillation (against a small fixed
teacher, and once against the real all-MiniLM-L6-v2) and contrastive training lower their losses, the checkpoint
and its summary, the config's checks, bad input, `python -m hybridrag.encoders` in-process, and HybridTextEncoder /
make_encoder("hybrid-encoder:...").

Tiny students (hidden 32, one block) over the bundled MiniLM tokenizer, on one thread: seconds on a busy CPU."""
import json

import numpy as np
import pytest
import torch

from hybridrag.encoders import HybridEncoder
from hybridrag.encoders.__main__ import main
from hybridrag.encoders.retrieval import HybridTextEncoder
from hybridrag.encoders.train import (EncoderTrainingConfig, distillation_loss, info_nce, pydoc_passages,
                                      summary_path, teacher_embeddings, train_encoder)
from hybridrag.retrieval.encoder import (HashingEncoder, LazyEncoder, as_retrieval_encoder, encoder_from_manifest,
                                         make_encoder)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, conv_kernel_sizes=[3], window_size=4,
            output_dim=16, max_length=64, dropout=0.0)
TEXTS = ["The assert statement checks a condition and raises AssertionError when it is false.",
         "A for loop iterates over the items of any iterable, such as a list or a string.",
         "The with statement wraps a block in the methods of a context manager.",
         "Augmented assignment like x += 1 updates the target in place where it can.",
         "Exceptions are raised with raise and handled by try and except clauses.",
         "A class definition creates a new type whose instances have attributes and methods.",
         "Lambda expressions create small anonymous functions of one expression.",
         "Imports bind a module's name in the namespace of the importing module.",
         "Slicing a sequence selects a range of its items with start, stop and step.",
         "Generators produce values lazily with yield, one at a time.",
         "Dictionaries map hashable keys to values and keep insertion order.",
         "The global statement declares names that refer to module-level variables."]
FAST = dict(batch_size=4, warmup=0, eval_size=0, init_embeddings=False, learning_rate=3e-3)


def tiny(seed=0, **changes):
    torch.manual_seed(seed)
    return HybridEncoder({**TINY, **changes})


@pytest.fixture(scope="module")
def hashing():
    return HashingEncoder(16)


def held_distill(encoder, texts, teacher):
    """The distillation loss of `encoder` against `teacher` on `texts`, in eval mode."""
    targets = torch.from_numpy(teacher_embeddings(teacher, texts))
    encoder.eval()
    with torch.no_grad():
        pooled = encoder(*encoder._batch_tensors(encoder.tokenize(texts)[0], torch.device("cpu")))["pooled"]
    return float(distillation_loss(pooled, targets))


# ---------------------------------------------------------------- training lowers the losses

def test_distillation_lowers_the_loss_against_a_fixed_teacher(hashing):
    encoder = tiny()
    before = held_distill(encoder, TEXTS, hashing)
    summary = train_encoder(encoder, TEXTS, {**FAST, "steps": 40}, teacher=hashing, progress=False)
    after = held_distill(encoder, TEXTS, hashing)
    assert before > 0.8 and after < 0.5 * before, (before, after)
    assert [h["step"] for h in summary["history"]] == list(range(1, 41))
    assert all(np.isfinite(h["loss"]) and h["loss"] == h["distill"] for h in summary["history"])
    assert summary["teacher"] == {"name": "hashing-16", "dimension": 16}
    assert not encoder.training and summary["checkpoint"] is None


def test_distillation_against_a_tiny_hybrid_encoder_teacher_and_held_out_evals():
    teacher = tiny(seed=1).eval()
    encoder = tiny(seed=2)
    config = {**FAST, "steps": 30, "eval_size": 4, "eval_every": 10, "distill_metric": "cosine+mse"}
    summary = train_encoder(encoder, TEXTS, config, teacher=teacher, progress=False)
    assert [e["step"] for e in summary["evals"]] == [0, 10, 20, 30]
    assert summary["texts"] == {"train": 8, "eval": 4, "longer_than_max_length": 0}
    history = [h["loss"] for h in summary["history"]]
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])


def test_contrastive_loss_decreases():
    encoder = tiny()
    summary = train_encoder(encoder, TEXTS, {**FAST, "steps": 40, "loss": "contrastive", "temperature": 0.1},
                            progress=False)
    losses = [h["contrastive"] for h in summary["history"]]
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8]), losses
    assert summary["teacher"] is None


def test_both_losses_are_mixed_by_distill_weight(hashing):
    summary = train_encoder(tiny(), TEXTS[:8], {**FAST, "steps": 3, "loss": "both", "distill_weight": 0.25},
                            teacher=hashing, progress=False)
    for h in summary["history"]:
        assert h["loss"] == pytest.approx(0.25 * h["distill"] + 0.75 * h["contrastive"], rel=1e-5)


def test_with_the_real_minilm_teacher():
    from hybridrag.encoders.train import _teacher_token_embeddings
    from hybridrag.retrieval.encoder import DenseEncoder

    teacher = DenseEncoder(show_progress=False)
    encoder = tiny(output_dim=384)
    before = held_distill(encoder, TEXTS[:8], teacher)
    train_encoder(encoder, TEXTS[:8], {**FAST, "steps": 10}, teacher=teacher, progress=False)
    assert held_distill(encoder, TEXTS[:8], teacher) < 0.8 * before
    table, tokenizer = _teacher_token_embeddings(teacher)  # what init_embeddings copies from MiniLM
    assert tuple(table.shape) == (30522, 384) and tokenizer.get_vocab() == encoder.tokenizer.get_vocab()


def test_init_embeddings_copies_the_teachers_token_table():
    teacher, encoder = tiny(seed=1).eval(), tiny(seed=2)
    assert not torch.allclose(encoder.embed.weight, teacher.embed.weight)
    train_encoder(encoder, TEXTS, {**FAST, "steps": 1, "init_embeddings": True, "learning_rate": 1e-9},
                  teacher=teacher, progress=False)
    assert torch.allclose(encoder.embed.weight, teacher.embed.weight, atol=1e-6)
    with pytest.raises(ValueError, match=r"the teacher's token embeddings are \(30522, 32\), the student's"):
        train_encoder(tiny(hidden_size=64), TEXTS, {**FAST, "steps": 1, "init_embeddings": True},
                      teacher=HybridEncoder({**TINY, "output_dim": 16}), progress=False)


# ---------------------------------------------------------------- files

def test_checkpoint_and_summary_are_written(tmp_path, hashing):
    output = tmp_path / "student" / "encoder.pt"
    encoder = tiny()
    summary = train_encoder(encoder, TEXTS, {**FAST, "steps": 2, "output": str(output)}, teacher=hashing,
                            progress=False)
    assert summary["checkpoint"] == str(output) and output.is_file()
    written = json.loads(summary_path(output).read_text())
    assert summary_path(output).name == "encoder.training.json"
    assert written["config"]["steps"] == 2 and len(written["history"]) == 2
    assert written["encoder_config"] == encoder.config.to_dict()
    loaded = HybridEncoder.load(output)
    assert np.allclose(loaded.encode(TEXTS[:3]), encoder.encode(TEXTS[:3]), atol=1e-6)


def test_teacher_embeddings_cache(tmp_path, hashing):
    calls = []

    class Counting:
        name, dimension = "counting", 16

        def encode(self, texts):
            calls.append(len(texts))
            return hashing.encode(texts)

    cache = tmp_path / "teacher.npz"
    first = teacher_embeddings(Counting(), TEXTS, cache)
    again = teacher_embeddings(Counting(), TEXTS, cache)
    assert calls == [len(TEXTS)] and np.array_equal(first, again)
    assert np.allclose(np.linalg.norm(first, axis=1), 1)
    teacher_embeddings(Counting(), TEXTS[:3], cache)  # other texts: another key, computed and rewritten
    assert calls == [len(TEXTS), 3]
    with pytest.raises(ValueError, match="a HybridEncoder has none"):  # no .name: the key would not say which model
        teacher_embeddings(tiny(), TEXTS, cache)


def test_pydoc_passages_fit_their_windows():
    tokenizer = tiny().tokenizer
    passages = pydoc_passages(tokenizer, lengths=(64,))
    assert len(passages) > 1000 and len(set(passages)) == len(passages)
    lengths = [len(ids) for ids in tokenizer(passages[:200], add_special_tokens=False)["input_ids"]]
    assert max(lengths) <= 64 + 2 and min(lengths) >= 6  # cut at token boundaries; a cut word may re-split
    with pytest.raises(ValueError, match="lengths"):
        pydoc_passages(tokenizer, lengths=(4,))


def test_info_nce_is_low_for_matching_views():
    a = torch.eye(4)
    assert float(info_nce(a, a, 0.05)) < 1e-3 < float(info_nce(a, a.roll(1, dims=0), 0.05))


# ---------------------------------------------------------------- config and bad input

def test_config_round_trips_through_json_and_yaml(tmp_path):
    config = EncoderTrainingConfig(steps=20, warmup=5, loss="both", distill_weight=0.3, teacher_cache="t.npz")
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "c.yaml").write_text("steps: 20\nwarmup: 5\nloss: both\ndistill_weight: 0.3\nteacher_cache: t.npz\n")
    assert EncoderTrainingConfig.from_any(tmp_path / "c.json") == config
    assert EncoderTrainingConfig.from_any(str(tmp_path / "c.yaml")) == config


@pytest.mark.parametrize("values, match", [
    ({"loss": "triplet"}, "loss must be one of 'distill', 'contrastive', 'both', got 'triplet'"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"steps": 10, "warmup": 11}, "warmup must be <= steps"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
    ({"loss": "contrastive", "batch_size": 1}, "batch_size must be an int >= 2"),
    ({"distill_weight": 0.3}, "distill_weight weighs the two terms of loss='both'"),
    ({"loss": "both", "distill_weight": 1.5}, "distill_weight must be a finite number in"),
    ({"distill_metric": "l1"}, "distill_metric must be one of"),
    ({"temperature": 0}, "temperature must be a finite number"),
    ({"teacher_cache": "cache.json"}, "teacher_cache must be an .npz path"),
    ({"init_embeddings": "yes"}, "init_embeddings must be True or False"),
    ({"epochs": 3}, r"unknown keys \['epochs'\]"),
])
def test_config_checks(values, match):
    with pytest.raises(ValueError, match=match):
        EncoderTrainingConfig.from_any(values)


def test_bad_input(hashing):
    config = {**FAST, "steps": 1}
    with pytest.raises(ValueError, match="texts is empty"):
        train_encoder(tiny(), [], config, teacher=hashing)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        train_encoder(tiny(), ["a text", 3], config, teacher=hashing)
    with pytest.raises(ValueError, match=r"the teacher's dimension \(32\) must equal the student's output_dim \(16\)"):
        train_encoder(tiny(), TEXTS, config, teacher=HashingEncoder(32))
    with pytest.raises(ValueError, match="a teacher was given but loss='contrastive'"):
        train_encoder(tiny(), TEXTS, {**config, "loss": "contrastive"}, teacher=hashing)
    with pytest.raises(ValueError, match="a HashingEncoder has none"):
        train_encoder(tiny(), TEXTS, {**config, "init_embeddings": True}, teacher=hashing)
    with pytest.raises(ValueError, match=r"eval_size \(12\) must be less than the number of texts \(12\)"):
        train_encoder(tiny(), TEXTS, {**config, "eval_size": 12}, teacher=hashing)
    with pytest.raises(ValueError, match=r"batch_size \(4\) is more than the 3 training texts"):
        train_encoder(tiny(), TEXTS[:3], config, teacher=hashing)
    with pytest.raises(ValueError, match=r"config.max_length \(256\) must be <= the encoder's max_length \(64\)"):
        train_encoder(tiny(), TEXTS, {**config, "max_length": 256}, teacher=hashing)
    quantized = tiny()
    quantized.quantize()
    with pytest.raises(ValueError, match="the encoder is quantized"):
        train_encoder(quantized, TEXTS, config, teacher=hashing)
    with pytest.raises(TypeError, match="encoder must be a HybridEncoder"):
        train_encoder(hashing, TEXTS, config, teacher=hashing)
    with pytest.warns(UserWarning, match="1 of 5 training texts are longer than max_length=40 tokens"):
        train_encoder(tiny(), TEXTS[:4] + [" ".join(TEXTS)], {**config, "max_length": 40}, teacher=hashing)


# ---------------------------------------------------------------- command line

def test_cli_help(capsys):
    assert main(["--help"]) == 0
    assert "train | evaluate" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--output" in out and "--loss {distill,contrastive,both}" in out


def test_cli_refusals(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "e.pt"), "--steps", "5"]) == 2
    assert "--steps 5: warmup must be <= steps (5), got 100" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path / "e.pt"), "--temperature", "-1"]) == 2
    assert "error: --temperature -1.0: temperature must be" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path), "--steps", "5", "--warmup", "1"]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err


def test_cli_trains_a_tiny_encoder(tmp_path, capsys):
    (tmp_path / "shape.json").write_text(json.dumps(TINY))
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    output = tmp_path / "e.pt"
    assert main(["train", "--output", str(output), "--encoder-config", str(tmp_path / "shape.json"), "--texts",
                 str(tmp_path / "texts.txt"), "--loss", "contrastive", "--no-init-embeddings", "--steps", "3",
                 "--warmup", "1", "--batch-size", "4", "--eval-size", "4", "--no-progress"]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    assert HybridEncoder.load(output).config.hidden_size == 32
    assert json.loads(summary_path(output).read_text())["config"]["loss"] == "contrastive"


def test_pydoc_retrieval_quality_scores_any_encoder():
    from hybridrag.encoders.retrieval import load_queries, pydoc_retrieval_quality

    queries = load_queries()
    assert len(queries) == 184 and {q["split"] for q in queries} == {"train", "test"}
    rows = pydoc_retrieval_quality({"hashing": HashingEncoder(64)}, queries[:30], splits=("all", "test"))
    assert [(r["method"], r["split"]) for r in rows] == [("hashing", "all"), ("hashing", "test")]
    assert rows[0]["queries"] == 30 and rows[0]["chunks"] > 79
    assert all(0 <= r[m] <= 1 for r in rows for m in ("recall@1", "recall@10", "mrr", "ndcg@10"))
    assert rows[0]["recall@1"] <= rows[0]["recall@5"] <= rows[0]["recall@10"]


# ---------------------------------------------------------------- the knowledge base's encoder

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny().save(tmp_path_factory.mktemp("adapter") / "encoder.pt")


def test_adapter_returns_normalised_float32_vectors(checkpoint):
    encoder = HybridTextEncoder(checkpoint)
    vectors = encoder.encode(TEXTS[:5])
    assert vectors.shape == (5, 16) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert encoder.encode([]).shape == (0, 16)
    assert encoder.name.startswith(f"hybrid-encoder:{checkpoint.resolve()}#") and encoder.dimension == 16
    assert encoder.tokenizer is encoder.encoder.tokenizer and encoder.max_length == 64
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("one text")


def test_make_encoder_and_the_manifest_rebuild_it(checkpoint):
    encoder = make_encoder(f"hybrid-encoder:{checkpoint}")
    assert isinstance(encoder, HybridTextEncoder)
    rebuilt = encoder_from_manifest(encoder.name, encoder.dimension)
    assert isinstance(rebuilt, LazyEncoder)
    assert np.allclose(rebuilt.encode(TEXTS[:2]), encoder.encode(TEXTS[:2]))
    with pytest.raises(ValueError, match="retrained or replaced"):
        make_encoder(f"hybrid-encoder:{checkpoint.resolve()}#000000000000")
    with pytest.raises(FileNotFoundError, match="no HybridEncoder checkpoint"):
        make_encoder("hybrid-encoder:/nonexistent/encoder.pt")


def test_an_encoder_object_is_named_by_its_weights():
    encoder = tiny()
    wrapped = as_retrieval_encoder(encoder)
    assert isinstance(wrapped, HybridTextEncoder) and wrapped.encoder is encoder
    assert wrapped.name.startswith("HybridEncoder-") and len(wrapped.name) == len("HybridEncoder-") + 12
    assert HybridTextEncoder(tiny()).name == wrapped.name  # the same config and weights
    assert HybridTextEncoder(tiny(seed=1)).name != wrapped.name
    assert as_retrieval_encoder(wrapped) is wrapped
    hashing = HashingEncoder(8)
    assert as_retrieval_encoder(hashing) is hashing
    with pytest.raises(TypeError, match="encoder must be a retrieval encoder .* or a HybridEncoder, got dict"):
        as_retrieval_encoder({})


def test_a_hybrid_encoder_is_a_cascade_student():
    from hybridrag.distillation import retrieval_cascade
    from hybridrag.retrieval import Document

    documents = [Document(f"d{i}", text) for i, text in enumerate(TEXTS)]
    cascade = retrieval_cascade(documents, tiny(), HashingEncoder(32), k=2, threshold=0.0, index_kind="flat")
    assert cascade.student.knowledge_base.encoder.name.startswith("HybridEncoder-")
    assert cascade(TEXTS[3])["answered_by"] == "student"  # a margin is never below 0


def test_non_finite_vectors_are_refused():
    encoder = tiny()
    with torch.no_grad():
        encoder.output.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="returned non-finite vectors for 2 texts"):
        HybridTextEncoder(encoder, name="diverged").encode(TEXTS[:2])


def test_adapter_in_a_knowledge_base(checkpoint):
    from hybridrag.retrieval import Document, KnowledgeBase

    documents = [Document(f"d{i}", text) for i, text in enumerate(TEXTS)]
    knowledge_base = KnowledgeBase.build(documents, HybridTextEncoder(checkpoint), index_kind="flat")
    hits = knowledge_base.search(TEXTS[3], k=3, mode="dense")
    assert hits[0].document.id == "d3"  # its own text is its nearest neighbour
