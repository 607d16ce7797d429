"""hybridrag.distillation: the KL loss against a hand computation (T^2 scaling, padded positions), embedding losses,
the confidence measures, the cascade's calibration on a synthetic student/teacher pair whose confidences are known
(the expected threshold, what is kept and escalated, statistics that add up, measured evaluation), a retrieval cascade
over a small corpus (hashing student, all-MiniLM-L6-v2 teacher), DistillationConfig, and bad input."""
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydoc_data.topics import topics

from hybridrag.distillation import (DistillationConfig, KnowledgeBaseAnswerer, TeacherStudentCascade, confidence,
                                    default_agreement, embedding_distillation_loss, kl_distillation_loss,
                                    max_probability, retrieval_cascade, score_entropy, score_margin, token_entropy)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- losses

def test_kl_loss_is_the_hand_computation_times_t_squared():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    expected = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = [math.exp(x / T) for x in s_row]
        zt = [math.exp(x / T) for x in t_row]
        ps = [z / sum(zs) for z in zs]
        pt = [z / sum(zt) for z in zt]
        expected.append(T * T * sum(b * math.log(b / a) for a, b in zip(ps, pt)))
    per_position = kl_distillation_loss(student, teacher, T, reduction="none")
    assert per_position.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(kl_distillation_loss(student, teacher, T)) == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert float(kl_distillation_loss(student, teacher, T, reduction="sum")) == pytest.approx(sum(expected), rel=1e-6)
    # the same as torch's KL of the softened distributions, scaled by T^2, for several T
    for T in (0.5, 1.0, 4.0):
        reference = F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1), reduction="batchmean")
        assert float(kl_distillation_loss(student, teacher, T)) == pytest.approx(T * T * float(reference), rel=1e-5)


def test_kl_loss_is_zero_for_equal_logits_and_its_gradient_scales_with_t():
    logits = torch.randn(3, 5, 11)
    assert float(kl_distillation_loss(logits, logits.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7, requires_grad=True)
    for T in (1.0, 2.0, 5.0):
        (grad,) = torch.autograd.grad(kl_distillation_loss(student, teacher, T, reduction="sum"), student)
        # d/ds T^2 KL(p_t || p_s) = T (p_s - p_t): the T^2 factor keeps the soft targets' gradient from vanishing
        expected = T * (F.softmax(student / T, -1) - F.softmax(teacher / T, -1))
        torch.testing.assert_close(grad, expected.detach(), rtol=1e-5, atol=1e-6)
    loss = kl_distillation_loss(student, teacher, 2.0)
    loss.backward()
    assert teacher.grad is None  # the teacher is a target


def test_kl_loss_ignores_padded_positions():
    student, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss = kl_distillation_loss(student, teacher, 2.0, mask=mask)
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[~mask] = 1e4
    garbage_t[~mask] = -1e4
    assert float(kl_distillation_loss(garbage_s, garbage_t, 2.0, mask=mask)) == pytest.approx(float(loss), rel=1e-6)
    per_position = kl_distillation_loss(student, teacher, 2.0, mask=mask, reduction="none")
    assert per_position.shape == (2, 4) and (per_position[~mask] == 0).all()
    assert float(loss) == pytest.approx(float(per_position[mask].mean()), rel=1e-6)
    assert float(kl_distillation_loss(student, teacher, 2.0, mask=mask.int())) == pytest.approx(float(loss))
    s = student.clone().requires_grad_()
    kl_distillation_loss(s, teacher, 2.0, mask=mask).backward()
    assert (s.grad[~mask] == 0).all()


def test_kl_loss_handles_a_teacher_that_rules_tokens_out():
    student = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, -math.inf, 2.0]])
    loss = kl_distillation_loss(student, teacher, 1.0)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(student.grad).all()


def test_embedding_losses():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert embedding_distillation_loss(a, a * 5, "cosine").item() == pytest.approx(0.0, abs=1e-7)
    assert embedding_distillation_loss(a, b, "cosine", reduction="none").tolist() == pytest.approx([0.0, 1.0])
    assert embedding_distillation_loss(a, b, "mse").item() == pytest.approx(((4 + 0) / 2 + (1 + 4) / 2) / 2)
    assert embedding_distillation_loss(a, b, "mse").item() == pytest.approx(F.mse_loss(a, b).item())
    s = a.clone().requires_grad_()
    embedding_distillation_loss(s, b, "mse").backward()
    assert s.grad is not None


@pytest.mark.parametrize("call, error, match", [
    (lambda: kl_distillation_loss(torch.randn(2, 3), torch.randn(2, 4), 1.0), ValueError, "one shape"),
    (lambda: kl_distillation_loss(torch.randn(2, 3), torch.randn(2, 3), 0.0), ValueError, "temperature must be"),
    (lambda: kl_distillation_loss(torch.randn(2, 3), torch.randn(2, 3), float("nan")), ValueError, "temperature"),
    (lambda: kl_distillation_loss(torch.tensor([[1.0, float("nan")]]), torch.randn(1, 2)), ValueError,
     "student_logits holds NaN"),
    (lambda: kl_distillation_loss(torch.randn(2, 3), torch.randn(2, 3), mask=torch.zeros(2, dtype=torch.bool)),
     ValueError, "no real position"),
    (lambda: kl_distillation_loss(torch.randn(2, 3), torch.randn(2, 3), mask=torch.ones(3, dtype=torch.bool)),
     ValueError, r"mask must have the logits' shape"),
    (lambda: kl_distillation_loss(torch.randint(0, 3, (2, 3)), torch.randn(2, 3)), TypeError, "floating-point"),
    (lambda: kl_distillation_loss(torch.randn(2, 3), torch.randn(2, 3), reduction="max"), ValueError, "reduction"),
    (lambda: embedding_distillation_loss(torch.randn(4, 256), torch.randn(4, 384)), ValueError,
     r"256-dim .* 384-dim .*project the student"),
    (lambda: embedding_distillation_loss(torch.randn(4, 8), torch.randn(3, 8)), ValueError, "one shape"),
    (lambda: embedding_distillation_loss(torch.randn(4, 8), torch.randn(4, 8), "l1"), ValueError, "kind must be"),
])
def test_bad_loss_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------- confidence

def test_confidence_measures():
    assert score_margin([0.2, 0.9, 0.5]) == pytest.approx(0.4)
    assert score_margin([0.3]) == math.inf and score_margin([]) == -math.inf
    assert score_entropy([1.0, 1.0, 1.0]) == pytest.approx(1.0) and score_entropy([5.0]) == 0.0
    assert score_entropy([10.0, 0.0, 0.0], temperature=0.1) < 1e-6
    assert token_entropy(torch.zeros(3, 10)) == pytest.approx(1.0)
    peaked = torch.full((2, 10), -30.0)
    peaked[:, 0] = 30.0
    assert token_entropy(peaked) == pytest.approx(0.0, abs=1e-6) and max_probability(peaked) == pytest.approx(1.0)
    mixed = torch.stack([torch.zeros(10), peaked[0]])
    assert max_probability(mixed, mask=torch.tensor([False, True])) == pytest.approx(1.0)
    assert confidence({"scores": [0.9, 0.5]}, "margin") == pytest.approx(0.4)
    assert confidence({"scores": [1.0, 1.0]}, "entropy") == pytest.approx(0.0)
    assert confidence({"scores": []}, "entropy") == -math.inf
    assert confidence({"logits": peaked}, "token_entropy") == pytest.approx(1.0)
    assert confidence({"attention_quality": 0.25}, "attention") == 0.25
    assert confidence({"confidence": 3}, "given") == 3.0
    assert confidence({"x": 2}, lambda answer: answer["x"] / 4) == 0.5
    with pytest.raises(ValueError, match="measure 'margin' needs the answer's 'scores'"):
        confidence({"result": 1}, "margin")
    with pytest.raises(ValueError, match="scores must be finite"):
        confidence({"scores": [float("nan"), 1.0]}, "margin")
    with pytest.raises(ValueError, match="attention_quality must be a number in"):
        confidence({"attention_quality": 1.5}, "attention")
    with pytest.raises(ValueError, match="gave NaN"):
        confidence({}, lambda answer: float("nan"))


# ---------------------------------------------------------------- the cascade on a synthetic pair

MARGINS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
STUDENT_RIGHT = [True, True, True, False, True, False]


class Synthetic:
    """A student whose answer to query i has margin MARGINS[i] and is right (agrees with the teacher) when
    STUDENT_RIGHT[i]; fixed timings (student 0.01 s, teacher 0.1 s) through the protocol's "seconds"."""

    def __init__(self):
        self.teacher_calls = []

    def student(self, query):
        i = int(query[1:])
        return {"result": "right" if STUDENT_RIGHT[i] else "wrong", "scores": [1.0, 1.0 - MARGINS[i], 0.0],
                "seconds": 0.01}

    def teacher(self, query):
        self.teacher_calls.append(query)
        return {"result": "right", "seconds": 0.1}


QUERIES = [f"q{i}" for i in range(len(MARGINS))]


def test_calibrate_picks_the_lowest_threshold_that_reaches_the_target():
    pair = Synthetic()
    cascade = TeacherStudentCascade(pair.student, pair.teacher, measure="margin")
    report = cascade.calibrate(QUERIES, target_agreement=0.95)
    # kept at 0.4: 4/6 agree; 0.5: 4/5; 0.6: 3/4; 0.7: 3/3 -> 0.7
    assert cascade.threshold == pytest.approx(0.7) and report["threshold"] == pytest.approx(0.7)
    assert report["reached"] and report["kept_share"] == pytest.approx(0.5) and report["agreement_kept"] == 1.0
    assert report["student_agreement"] == pytest.approx(4 / 6) and report["cascade_agreement"] == 1.0
    assert [round(t, 6) for t, _, _ in report["candidates"]] == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert report["teacher_seconds"] == pytest.approx(0.1) and report["student_seconds"] == pytest.approx(0.01)
    assert report["expected_time_saved_share"] == pytest.approx(1 - (0.01 + 0.5 * 0.1) / 0.1)
    assert len(pair.teacher_calls) == len(QUERIES)
    assert cascade.calibrate(QUERIES, target_agreement=0.75)["threshold"] == pytest.approx(0.5)  # 4/5 >= 0.75


def test_the_cascade_keeps_confident_answers_and_escalates_the_rest():
    pair = Synthetic()
    cascade = TeacherStudentCascade(pair.student, pair.teacher, measure="margin")
    cascade.calibrate(QUERIES, target_agreement=0.95)
    pair.teacher_calls.clear()
    outputs = [cascade(query) for query in QUERIES]
    assert [o["answered_by"] for o in outputs] == ["student"] * 3 + ["teacher"] * 3
    assert all(o["result"] == "right" for o in outputs)  # the wrong student answers were escalated
    assert pair.teacher_calls == ["q3", "q4", "q5"]
    assert outputs[0]["confidence"] == pytest.approx(0.9) and outputs[0]["teacher"] is None
    assert outputs[4]["seconds"] == {"student": 0.01, "teacher": 0.1, "total": pytest.approx(0.11)}
    stats = cascade.stats()
    assert stats["queries"] == 6 and stats["kept"] + stats["escalated"] == stats["queries"] and stats["kept"] == 3
    assert stats["kept_share"] == 0.5
    assert stats["student_seconds"] == pytest.approx(0.06) and stats["teacher_seconds"] == pytest.approx(0.3)
    assert stats["cascade_seconds"] == pytest.approx(stats["student_seconds"] + stats["teacher_seconds"])
    assert stats["teacher_seconds_per_query"] == pytest.approx(0.1)  # 6 calibration + 3 escalation calls
    assert stats["teacher_only_seconds"] == pytest.approx(0.6)
    assert stats["time_saved_seconds"] == pytest.approx(0.6 - 0.36)
    assert stats["time_saved_share"] == pytest.approx(0.24 / 0.6)
    cascade.reset_stats()
    assert cascade.stats()["queries"] == 0 and cascade.stats()["kept_share"] is None


def test_evaluate_measures_both_models_on_every_query():
    pair = Synthetic()
    cascade = TeacherStudentCascade(pair.student, pair.teacher, measure="margin", threshold=0.5)
    result = cascade.evaluate(QUERIES, gold=["right"] * 6)
    assert result["kept_share"] == pytest.approx(5 / 6) and result["escalations"] == 1
    assert result["student_agreement_with_teacher"] == pytest.approx(4 / 6)
    assert result["agreement_with_teacher"] == pytest.approx(5 / 6)  # q3 kept and wrong, q5 escalated
    assert result["accuracy"] == {"cascade": pytest.approx(5 / 6), "student": pytest.approx(4 / 6), "teacher": 1.0}
    assert result["seconds"]["teacher_only"] == pytest.approx(0.6)
    assert result["seconds"]["cascade"] == pytest.approx(0.06 + 0.1)
    assert result["time_saved_share"] == pytest.approx(1 - 0.16 / 0.6)
    assert cascade.stats()["queries"] == 0  # run()'s statistics untouched


def test_calibration_against_gold_answers_runs_no_teacher():
    def teacher(query):
        raise AssertionError("the teacher must not run when gold answers are given")

    pair = Synthetic()
    cascade = TeacherStudentCascade(pair.student, teacher, measure="margin")
    report = cascade.calibrate(QUERIES, gold=["right"] * 6, target_agreement=1.0)
    assert report["threshold"] == pytest.approx(0.7) and report["reference"] == "gold"
    assert report["teacher_seconds"] is None and report["cascade_agreement"] is None


def test_no_reachable_target_escalates_everything(caplog):
    cascade = TeacherStudentCascade(lambda q: {"result": "wrong", "scores": [1.0, 0.5]},
                                    lambda q: {"result": "right"}, measure="margin")
    with caplog.at_level(logging.WARNING, logger="hybridrag.distillation.cascade"):
        report = cascade.calibrate(["a", "b"])
    assert report["threshold"] == math.inf and not report["reached"] and report["kept_share"] == 0.0
    assert "every query will escalate" in caplog.text
    assert cascade("c")["answered_by"] == "teacher"
    passed_on = TeacherStudentCascade(cascade.student, cascade.teacher, "margin", threshold=report["threshold"])
    assert passed_on("c")["answered_by"] == "teacher"  # inf, calibrate's "escalate all", is a valid threshold
    assert DistillationConfig(threshold=math.inf).threshold == math.inf


def test_objects_with_an_answer_method_and_a_custom_agreement():
    class Model:
        def __init__(self, ids):
            self.ids = ids

        def answer(self, query):
            return {"result": self.ids, "confidence": 0.3}

    cascade = TeacherStudentCascade(Model(["d1", "d2"]), Model(["d1", "d3"]), measure="given",
                                    agree=lambda a, b: set(a) == set(b))
    assert cascade.calibrate(["q"])["threshold"] == math.inf  # sets differ
    assert default_agreement(["d1", "d2"], ["d1", "d3"]) and default_agreement(" Paris.", "paris")
    assert not default_agreement("Paris", "Rome")
    assert cascade.calibrate(["q"], agree=default_agreement)["threshold"] == pytest.approx(0.3)


@pytest.mark.parametrize("make, error, match", [
    (lambda s, t: TeacherStudentCascade(s, t, "entropy", threshold=1.5), ValueError, r"in \[0, 1\] for measure"),
    (lambda s, t: TeacherStudentCascade(s, t, "margin", threshold=-0.1), ValueError, ">= 0 for measure 'margin'"),
    (lambda s, t: TeacherStudentCascade(s, t, "margin", threshold=float("nan")), ValueError, "finite number"),
    (lambda s, t: TeacherStudentCascade(s, t, "perplexity"), ValueError, "measure must be one of"),
    (lambda s, t: TeacherStudentCascade("student", t), TypeError, "student must have an answer"),
    (lambda s, t: TeacherStudentCascade(s, t).calibrate([]), ValueError, "validation_queries is empty"),
    (lambda s, t: TeacherStudentCascade(s, t).calibrate("q0"), TypeError, "must be a list of queries"),
    (lambda s, t: TeacherStudentCascade(s, t).calibrate(QUERIES, gold=["right"]), ValueError, "gold has 1 answers"),
    (lambda s, t: TeacherStudentCascade(s, t).calibrate(QUERIES, target_agreement=0), ValueError, "target_agreement"),
    (lambda s, t: TeacherStudentCascade(s, t).calibrate(QUERIES, agree=lambda a, b: 1), TypeError, "return a bool"),
    (lambda s, t: TeacherStudentCascade(s, t)("q0"), ValueError, "no threshold: pass threshold= or call calibrate"),
    (lambda s, t: TeacherStudentCascade(s, t, "token_entropy", threshold=0.5)("q0"), ValueError,
     "needs the answer's 'logits'"),
    (lambda s, t: TeacherStudentCascade(lambda q: "text", t, threshold=0.5)("q0"), TypeError,
     "must answer with a dict holding 'result'"),
    (lambda s, t: TeacherStudentCascade(lambda q: {"result": 1, "scores": [1, 0], "seconds": -1}, t,
                                        threshold=0.5)("q0"), ValueError, "seconds=-1"),
])
def test_bad_cascade_input(make, error, match):
    pair = Synthetic()
    with pytest.raises(error, match=match):
        make(pair.student, pair.teacher)


def test_distillation_config(tmp_path):
    config = DistillationConfig(measure="entropy", threshold=0.4, target_agreement=0.9)
    path = tmp_path / "distillation.json"
    path.write_text(__import__("json").dumps(config.to_dict()))
    assert DistillationConfig.from_any(path) == config
    pair = Synthetic()
    cascade = TeacherStudentCascade.from_config(pair.student, pair.teacher, config)
    assert cascade.measure == "entropy" and cascade.threshold == 0.4
    for values, match in [({"measure": "entropy", "threshold": 2.0}, r"threshold must lie in \[0, 1\]"),
                          ({"target_agreement": 1.5}, "target_agreement"), ({"temperature": 0}, "temperature"),
                          ({"embedding_loss": "l1"}, "embedding_loss"), ({"measure": "loss"}, "measure"),
                          ({"thresold": 0.5}, "unknown keys")]:
        with pytest.raises(ValueError, match=match):
            DistillationConfig.from_any(values)


# ---------------------------------------------------------------- retrieval cascade

TOPICS = ["assert", "for", "while", "if", "try", "with", "pass", "global", "nonlocal", "lambda", "return", "raise",
          "import", "del", "break", "continue"]
VALIDATION = ["Which exception does a failing assert raise?", "How does a for loop iterate over a sequence?",
              "What does the pass statement do?", "How do I make a variable global inside a function?",
              "What does lambda create?", "How is an exception raised?", "How does import find a module?",
              "What does break do in a loop?", "How does del remove a name?", "What does continue do?"]
TEST = ["What happens when assert fails?", "How does the with statement manage a context?",
        "What does nonlocal do?", "How does a while loop run?", "What does return give back?"]


@pytest.fixture(scope="module")
def documents():
    from hybridrag.retrieval import Document

    return [Document(name, topics[name][:1500], name) for name in TOPICS]


def test_retrieval_cascade_hashing_student_minilm_teacher(documents):
    from hybridrag.retrieval import HashingEncoder

    cascade = retrieval_cascade(documents, HashingEncoder(64), k=3)
    assert isinstance(cascade.student, KnowledgeBaseAnswerer)
    assert cascade.teacher.knowledge_base.encoder.name == "sentence-transformers/all-MiniLM-L6-v2"
    report = cascade.calibrate(VALIDATION, target_agreement=0.8)
    threshold = report["threshold"]
    assert report["queries"] == len(VALIDATION) and len(report["confidences"]) == len(VALIDATION)
    if report["reached"]:
        kept = [c >= threshold for c in report["confidences"]]
        assert np.mean([a for a, k in zip(report["agreements"], kept) if k]) >= 0.8
        assert report["kept_share"] == pytest.approx(np.mean(kept))
    outputs = [cascade(query) for query in TEST]
    for out in outputs:
        assert out["answered_by"] == ("student" if out["confidence"] >= threshold else "teacher")
        assert len(out["result"]) == 3 and all(doc_id in TOPICS for doc_id in out["result"])
        assert out["confidence"] == pytest.approx(score_margin(out["student"]["scores"]))
    stats = cascade.stats()
    assert stats["queries"] == len(TEST) and stats["kept"] + stats["escalated"] == len(TEST)
    assert stats["escalated"] == sum(o["escalated"] for o in outputs)
    assert stats["teacher_seconds_per_query"] > 0 and stats["time_saved_share"] is not None
    measured = cascade.evaluate(TEST)
    assert 0 <= measured["kept_share"] <= 1 and measured["seconds"]["teacher_only"] > 0


def test_by_document_folds_passages_so_the_margin_compares_documents(documents):
    from hybridrag.retrieval import HashingEncoder, KnowledgeBase, chunk_documents

    chunks = chunk_documents(documents, chunk_tokens=60, overlap=10)
    knowledge_base = KnowledgeBase.build(chunks, HashingEncoder(64), index_kind="flat")
    passages = KnowledgeBaseAnswerer(knowledge_base, k=40, mode="bm25")
    folded = KnowledgeBaseAnswerer(knowledge_base, k=3, mode="bm25", by_document=True)
    assert folded.by_document and "by_document=True" in repr(folded)
    question = "What happens when assert fails?"
    hits = passages(question)["hits"]
    best = {}
    for hit in hits:
        best.setdefault(hit.document.metadata["source_id"], hit.score)
    assert len(hits) > len(best)  # some documents have more than one passage among the hits
    answer = folded(question)
    assert answer["result"] == list(best)[:3] and answer["scores"] == list(best.values())[:3]
    assert [h.document.metadata["source_id"] for h in answer["hits"]] == answer["result"]
    assert len(set(answer["result"])) == 3  # never two passages of one document
    # the chunked cascade's margin is top-1 minus top-2 document
    cascade = retrieval_cascade(chunks, HashingEncoder(64), HashingEncoder(32), k=3, mode="bm25", threshold=0.0,
                                index_kind="flat", by_document=True)
    out = cascade(question)
    assert out["confidence"] == pytest.approx(score_margin(answer["scores"]))
    with pytest.raises(TypeError, match="by_document must be True or False, got 1"):
        KnowledgeBaseAnswerer(knowledge_base, by_document=1)
