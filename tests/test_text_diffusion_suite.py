"""The text diffusion benchmark (benchmarks/text_diffusion_quality.py) end to end at a tiny size: 120 windows of 6
pydoc topics encoded by MiniLM, a 32-wide 1-layer model trained to 25 and 50 steps, 8 held-out conditions scored by
MiniLM and SmolLM2, through its command line; and its helpers on small inputs. The quick and full runs belong to
`python -m benchmarks.text_diffusion_quality`."""
import contextlib
import inspect
import io
import json
import math

import numpy as np
import pytest
import torch

from benchmarks import text_diffusion_quality as tdq
from benchmarks.common import RESULTS_ROOT
from hybridrag.diffusion import DocumentGenerator
from hybridrag.diffusion.documents import join_words, split_words
from hybridrag.retrieval.encoder import HashingEncoder

TINY = {"topics": 6, "windows": 120, "hidden_dim": 32, "num_layers": 1, "num_heads": 2, "steps": (25, 50),
        "conditions": 8}
METRICS = {"cos_condition": (-1, 1), "topic_recall@1": (0, 1), "distinct_2": (0, 1), "copy_4gram": (0, 1)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """(results dict, stdout, out folder) of `--quick` with the quick size replaced by TINY."""
    out = tmp_path_factory.mktemp("text_diffusion")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setitem(tdq.SIZES, "quick", TINY)
        assert tdq.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    return json.loads((out / "results-quick.json").read_text()), stdout.getvalue(), out


def test_the_run_reports_every_step_count_temperature_and_baseline(tiny_run):
    result, stdout, _ = tiny_run
    assert result["suite"] == "text_diffusion_quality" and result["size"] == "quick"
    data = result["data"]
    assert data["topics"] == 6 and data["windows"] == 120 and data["length"] == tdq.LENGTH == 48
    assert data["train_windows"] + data["held_out_windows"] == 120 and data["held_out_windows"] == 12
    assert data["conditions"] == 8 and data["train_sample_windows"] == 12
    assert result["training"]["steps"] == [25, 50] and len(result["training"]["stages"]) == 2
    assert result["model"]["vocab_size"] == data["vocabulary"] and result["model"]["max_length"] == 49
    expected = [(f"diffusion T={t:g}", s) for s in (25, 50) for t in tdq.TEMPERATURES]
    expected += [(name, None) for name in tdq.BASELINES]
    assert [(row["method"], row.get("steps")) for row in result["rows"]] == expected
    for row in result["rows"]:
        assert row["passages"] == 8 and 0 < row["mean_words"] <= 48, row
        for key, (low, high) in METRICS.items():
            assert math.isfinite(row[key]) and low <= row[key] <= high, (row["method"], key, row[key])
        if row["perplexity"] is not None:
            assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1 and row["lm_tokens"] > 0
        assert row["method"] in stdout
    assert result["environment"]["cpu_threads"] == 1
    assert set(result["seconds"]) == {"encode", "train", "evaluate", "language_model", "total"}


def test_the_elbo_is_a_finite_bound_beside_the_unigram_cross_entropy(tiny_run):
    result, _, _ = tiny_run
    uniform = result["metrics"]["uniform_bits"]
    assert uniform == pytest.approx(math.log2(result["data"]["vocabulary"]))
    rows = {(r["method"], r.get("steps")): r for r in result["rows"]}
    unigram = rows[("unigram sample", None)]["elbo_bits"]
    assert 0 < unigram["held_out"]["mean"] < uniform and unigram["held_out"]["sem"] > 0  # Zipf: far below uniform
    for steps in (25, 50):
        elbo = rows[("diffusion T=1", steps)]["elbo_bits"]
        assert elbo == rows[("diffusion T=0", steps)]["elbo_bits"]  # one model, measured once a stage
        for split in ("held_out", "train"):
            assert math.isfinite(elbo[split]["mean"]) and 0 < elbo[split]["mean"] < 2 * uniform
            assert elbo[split]["sem"] > 0
    for name in tdq.BASELINES[:3]:
        assert rows[(name, None)].get("elbo_bits") is None


def test_the_baselines_are_ordered_as_real_text_must_be(tiny_run):
    result, _, _ = tiny_run
    rows = {r["method"]: r for r in result["rows"] if "steps" not in r}
    condition, same, other, unigram = (rows[name] for name in tdq.BASELINES)
    assert condition["cos_condition"] == pytest.approx(1.0, abs=1e-5)  # the condition itself
    assert same["cos_condition"] > other["cos_condition"]  # related real text is nearer than unrelated
    assert condition["perplexity"] < unigram["perplexity"]  # real text reads better than a bag of words
    assert same["copy_4gram"] == 1.0  # training windows are in the training windows
    assert same["perplexity"] is None and other["perplexity"] is None  # real text: the condition row is the reference


def test_examples_are_printed_and_kept(tiny_run):
    result, stdout, _ = tiny_run
    examples = result["examples"]
    assert len(examples) == 2 * len(tdq.TEMPERATURES) * tdq.EXAMPLES
    for example in examples:
        assert example["steps"] in (25, 50) and example["temperature"] in tdq.TEMPERATURES
        assert len(split_words(example["condition"])) == 48 and 0 < len(split_words(example["passage"])) <= 48
    last = [e for e in examples if e["steps"] == 50]
    assert stdout.count("condition: ") == tdq.EXAMPLES and last[0]["passage"] in stdout
    assert "unigram sample: " in stdout


def test_the_plot_is_a_png(tiny_run):
    _, stdout, out = tiny_run
    assert (out / "text_diffusion_quality-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in stdout


def test_the_constants_are_document_generator_defaults():
    defaults = inspect.signature(DocumentGenerator.train).parameters
    assert tdq.BATCH == defaults["batch_size"].default and tdq.LR == defaults["lr"].default
    assert tdq.MAX_VOCABULARY == defaults["max_vocabulary"].default
    assert tdq.SAMPLING_STEPS == defaults["sampling_steps"].default and tdq.LENGTH == defaults["length"].default


def test_windows_and_vocabulary_are_the_ones_document_generator_trains_on():
    spec = {"topics": 3, "windows": None}
    windows, topics = tdq.topic_windows(spec, seed=1)
    assert topics == 3 and all(len(words) == tdq.LENGTH for _, words in windows)
    tdq.check_round_trip(windows)
    by_topic = {}
    for topic, words in windows:
        by_topic.setdefault(topic, []).extend(words)
    texts = {document.id: "\n".join(line for line in document.text.splitlines() if not tdq.UNDERLINE.match(line))
             for document in tdq.corpus()}
    for topic, words in by_topic.items():  # consecutive windows: together a prefix of the topic's words
        assert split_words(texts[topic])[:len(words)] == words
    vocabulary, counts = tdq.build_vocabulary([words for _, words in windows])
    generator = DocumentGenerator.train([join_words(words) for _, words in windows], HashingEncoder(16), steps=1,
                                        hidden_dim=8, num_layers=1, num_heads=2, progress=False)
    assert vocabulary == generator.vocabulary and sum(counts.values()) == tdq.LENGTH * len(windows)


def test_a_broken_round_trip_is_refused():
    with pytest.raises(RuntimeError, match="1 windows do not survive"):
        tdq.check_round_trip([("t", ["a", "b"]), ("t", ["don", "'", "t"] * 2 + ["a b"])])


def test_conditions_come_with_a_same_topic_training_window_and_another_topic():
    topics = ["a"] * 5 + ["b"] * 5 + ["c"]
    train, held = np.array([0, 1, 2, 5, 6, 7]), np.array([3, 4, 8, 9, 10])
    conditions, same, other = tdq.pick_conditions(topics, train, held, 10, seed=0)
    assert sorted(conditions.tolist()) == [3, 4, 8, 9]  # topic c has no training window
    for c, s, o in zip(conditions, same, other):
        assert s in train and topics[s] == topics[c] and o in held and topics[o] != topics[c]


def test_diversity_and_copying_count_what_they_say():
    assert tdq.distinct_2(["a b a b", "a b"]) == pytest.approx(2 / 4)  # bigrams ab ba ab ab
    assert tdq.distinct_2(["a"]) is None
    grams = {("a", "b", "c", "d")}
    assert tdq.copy_share(["a b c d e", "x y z w"], grams) == pytest.approx(1 / 3)


def test_the_unigram_cross_entropy_is_add_one_smoothed():
    train = torch.tensor([[1, 1, 2]])  # counts 0, 2, 1 over a vocabulary of 3: p = 1/6, 3/6, 2/6
    result = tdq.unigram_bits(train, torch.tensor([[0, 1]]), 3)
    assert result["mean"] == pytest.approx((math.log2(6) + math.log2(2)) / 2)
    samples = tdq.unigram_samples({"x": 3, "y": 1}, 2, seed=0)
    assert len(samples) == 2 and all(set(split_words(s)) <= {"x", "y"} and len(split_words(s)) == 48
                                     for s in samples)


def test_the_elbo_is_seeded_and_stages_continue_one_model():
    spec = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2}
    model = tdq.make_model(spec, 20, 8, seed=0)
    ids, conditions = torch.randint(0, 20, (10, tdq.LENGTH)), torch.randn(10, 8)
    first = tdq.elbo_bits(model, ids, conditions, seed=3)
    assert first == tdq.elbo_bits(model, ids, conditions, seed=3) and first["sem"] > 0
    assert first != tdq.elbo_bits(model, ids, conditions, seed=4)
    before = [p.detach().clone() for p in model.parameters()]
    stages = list(tdq.train_stages(model, ids, conditions, (2, 5), seed=0))
    assert [(steps, len(history)) for steps, history, _ in stages] == [(2, 2), (5, 3)]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("argv, message", [(["--threads", "0"], "--threads must be >= 1"),
                                           (["--quick", "--record"], "--record records the full size"),
                                           (["--out", str(RESULTS_ROOT / "x")], "lies inside")])
def test_the_command_line_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        tdq.main(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as error:
        tdq.main(["--help"])
    assert error.value.code == 0 and "--quick" in capsys.readouterr().out
