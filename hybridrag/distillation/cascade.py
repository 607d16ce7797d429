"""TeacherStudentCascade: the student answers first; the teacher answers only when the student's confidence is below a
threshold chosen on validation data.

    cascade = TeacherStudentCascade(student, teacher, measure="margin")
    report = cascade.calibrate(validation_queries, target_agreement=0.95)   # sets cascade.threshold
    out = cascade(query)        # {"result", "answered_by": "student" | "teacher", "confidence", "seconds", ...}
    cascade.stats()             # kept share, escalations, time saved against the teacher alone
    cascade.evaluate(test_queries)   # both models on every query: measured agreement and time saved

The model protocol (student and teacher alike): an object with `answer(query) -> dict`, or a callable
`model(query) -> dict`. The dict holds
    "result": the answer (anything the agreement function compares: a ranked list of ids, a text, ...), required;
    what the confidence measure reads (hybridrag.distillation.confidence): "scores" (retrieval scores, 1-D),
        "logits" ((T, V) of the generated tokens, with an optional "mask" (T,)), "attention_quality" (in [0, 1]) or
        "confidence" (a number the model computed itself, measure "given");
    "seconds": optional, the model's own timing of this answer (finite, >= 0); without it the cascade times the
        call with time.perf_counter.
Anything else in the dict is passed through untouched. Ready-made models: hybridrag.distillation.adapters
(KnowledgeBaseAnswerer for retrieval, SystemAnswerer for a HybridRAGSystem).

Agreement: `agree(candidate, reference) -> bool` compares a student result with the teacher's (or a gold answer).
The default, `default_agreement`, compares texts after normalising case, whitespace and end punctuation, ranked
lists (retrieval) by their first item, and anything else with ==.

The threshold rule: an answer is kept when confidence >= threshold. `calibrate` runs the student on every
validation query and the teacher too (unless gold answers are given), then scans the distinct finite student
confidences from the lowest up and takes the first one whose kept answers (confidence >= it) agree with the
reference at least `target_agreement` of the time: the lowest threshold, so the fewest escalations, that reaches the
target on the validation data. When none does, every query escalates (threshold inf, with a warning logged).

Not thread-safe: one cascade's statistics are updated by each call.
"""
import logging
import math
import re
import time

import numpy as np

from .confidence import MEASURES, confidence
from .config import DistillationConfig, check_threshold

__all__ = ["TeacherStudentCascade", "default_agreement", "text_agreement", "top1_agreement"]

log = logging.getLogger(__name__)
_SPACE = re.compile(r"\s+")
_ENDS = " \t\n.,;:!?\"'`()[]{}"


def text_agreement(candidate, reference):
    """Two texts agree when equal after lowercasing, collapsing whitespace and stripping punctuation at both ends."""
    def normal(text):
        return _SPACE.sub(" ", str(text).lower()).strip(_ENDS)
    return normal(candidate) == normal(reference)


def top1_agreement(candidate, reference):
    """Two ranked lists (e.g. document ids, best first) agree when their first items are equal (both empty agree)."""
    candidate, reference = list(candidate), list(reference)
    if not candidate or not reference:
        return not candidate and not reference
    return candidate[0] == reference[0]


def default_agreement(candidate, reference):
    """text_agreement for two str, top1_agreement for two lists/tuples, == otherwise."""
    if isinstance(candidate, str) and isinstance(reference, str):
        return text_agreement(candidate, reference)
    if isinstance(candidate, (list, tuple)) and isinstance(reference, (list, tuple)):
        return top1_agreement(candidate, reference)
    return bool(candidate == reference)


def _as_model(model, name):
    """model's answer function: model.answer if it has one, else model itself if callable."""
    answer = getattr(model, "answer", None)
    if callable(answer):
        return answer
    if callable(model):
        return model
    raise TypeError(f"{name} must have an answer(query) -> dict method or be a callable query -> dict, got "
                    f"{type(model).__name__}")


def _check_agree(agree):
    if agree is None:
        return default_agreement
    if not callable(agree):
        raise TypeError(f"agree must be None or a callable(candidate, reference) -> bool, got {type(agree).__name__}")
    return agree


def _check_target(target_agreement):
    if isinstance(target_agreement, bool) or not isinstance(target_agreement, (int, float)) \
            or not 0.0 < target_agreement <= 1.0:
        raise ValueError(f"target_agreement must be a number in (0, 1], got {target_agreement!r}")
    return float(target_agreement)


def _check_queries(queries, name):
    if isinstance(queries, (str, bytes)) or not hasattr(queries, "__iter__"):
        raise TypeError(f"{name} must be a list of queries, got {type(queries).__name__}")
    queries = list(queries)
    if not queries:
        raise ValueError(f"{name} is empty: give at least one query")
    return queries


def _check_gold(gold, count, name):
    if gold is None:
        return None
    if isinstance(gold, (str, bytes)) or not hasattr(gold, "__len__"):
        raise TypeError(f"gold must be None or a list with one reference answer per query, got {type(gold).__name__}")
    gold = list(gold)
    if len(gold) != count:
        raise ValueError(f"gold has {len(gold)} answers but {name} has {count} queries: give one per query")
    return gold


def _agrees(agree, candidate, reference, index):
    value = agree(candidate, reference)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"agree must return a bool, got {type(value).__name__} ({value!r}) for query {index}")
    return bool(value)


class TeacherStudentCascade:
    """Student first, teacher when the student is not confident enough (see the module docstring for the protocol
    and the threshold rule).

    Args:
        student, teacher: models of the protocol (an object with answer(query) -> dict, or a callable).
        measure: the student's confidence: "margin" (top-1 minus top-2 retrieval score), "entropy" (1 - the
            normalised entropy of the softmax over the scores), "token_entropy" (1 - the mean normalised entropy of
            the generated tokens' distributions), "max_prob" (their mean top probability), "attention" (the
            answer's attention_quality), "given" (the model's own "confidence"), or a callable(answer) -> float
            (higher = more confident).
        threshold: None (set by calibrate; calling the cascade before raises) or the confidence at or above which
            the student's answer is kept: in [0, 1] for the bounded measures, >= 0 for "margin", finite.
        agree: the default agreement of calibrate and evaluate (callable(candidate, reference) -> bool); None =
            default_agreement.
        score_temperature: the "entropy" measure's softmax temperature over scores (finite > 0).
    """

    def __init__(self, student, teacher, measure="margin", threshold=None, *, agree=None, score_temperature=1.0):
        self._student = _as_model(student, "student")
        self._teacher = _as_model(teacher, "teacher")
        self.student, self.teacher = student, teacher
        if not callable(measure) and measure not in MEASURES:
            raise ValueError(f"measure must be one of {tuple(MEASURES)} or a callable(answer) -> float, got "
                             f"{measure!r}")
        self.measure = measure
        if isinstance(score_temperature, bool) or not isinstance(score_temperature, (int, float)) \
                or not math.isfinite(score_temperature) or score_temperature <= 0:
            raise ValueError(f"score_temperature must be a finite number > 0, got {score_temperature!r}")
        self.score_temperature = float(score_temperature)
        self.threshold = check_threshold(threshold, measure if isinstance(measure, str) else None)
        self.agree = _check_agree(agree)
        self.calibration = None  # calibrate's report
        self._teacher_times = []  # seconds of every teacher call (calibration, escalations): the teacher-only estimate
        self.reset_stats()

    @classmethod
    def from_config(cls, student, teacher, config=None, *, agree=None):
        """A cascade with DistillationConfig's measure, threshold and score_temperature (config: None, a
        DistillationConfig, a dict or a JSON/YAML path)."""
        config = DistillationConfig.from_any(config)
        return cls(student, teacher, config.measure, config.threshold, agree=agree,
                   score_temperature=config.score_temperature)

    def __repr__(self):
        measure = self.measure if isinstance(self.measure, str) else getattr(self.measure, "__name__", "callable")
        return (f"TeacherStudentCascade(measure={measure!r}, threshold={self.threshold}, "
                f"queries={self._stats['queries']}, kept={self._stats['kept']})")

    # ---------------------------------------------------------------- answering

    def _ask(self, model, name, query):
        """(answer dict, seconds) of one model call."""
        start = time.perf_counter()
        answer = model(query)
        seconds = time.perf_counter() - start
        if not isinstance(answer, dict) or "result" not in answer:
            got = f"a dict with keys {sorted(answer)}" if isinstance(answer, dict) else type(answer).__name__
            raise TypeError(f"the {name} must answer with a dict holding 'result' (and what the confidence measure "
                            f"reads), got {got}")
        reported = answer.get("seconds")
        if reported is not None:
            if isinstance(reported, bool) or not isinstance(reported, (int, float)) or not math.isfinite(reported) \
                    or reported < 0:
                raise ValueError(f"the {name}'s answer has seconds={reported!r}; it must be a finite number >= 0 "
                                 "(or left out: the cascade then times the call)")
            seconds = float(reported)
        return answer, seconds

    def _confidence(self, answer):
        return confidence(answer, self.measure, score_temperature=self.score_temperature)

    def _keeps(self, value):
        return self.threshold != math.inf and value >= self.threshold

    def run(self, query):
        """Answer `query`: the student's answer when its confidence >= threshold, else the teacher's.

        Returns {"result", "answered_by": "student" | "teacher", "escalated": bool, "confidence" (the student's),
        "threshold", "seconds": {"student", "teacher" (0.0 when kept), "total"}, "student": the student's answer
        dict, "teacher": the teacher's (None when kept)}. ValueError when no threshold is set yet.
        """
        if self.threshold is None:
            raise ValueError("the cascade has no threshold: pass threshold= or call calibrate(validation_queries) "
                             "first")
        student, student_seconds = self._ask(self._student, "student", query)
        value = self._confidence(student)
        teacher, teacher_seconds = None, 0.0
        if not self._keeps(value):
            teacher, teacher_seconds = self._ask(self._teacher, "teacher", query)
            self._teacher_times.append(teacher_seconds)
        stats = self._stats
        stats["queries"] += 1
        stats["kept" if teacher is None else "escalated"] += 1
        stats["student_seconds"] += student_seconds
        stats["teacher_seconds"] += teacher_seconds
        return {"result": student["result"] if teacher is None else teacher["result"],
                "answered_by": "student" if teacher is None else "teacher", "escalated": teacher is not None,
                "confidence": value, "threshold": self.threshold,
                "seconds": {"student": student_seconds, "teacher": teacher_seconds,
                            "total": student_seconds + teacher_seconds},
                "student": student, "teacher": teacher}

    __call__ = run

    # ---------------------------------------------------------------- statistics

    def reset_stats(self):
        """Forget the counts and timings of earlier run() calls (the calibration's teacher timings stay)."""
        self._stats = {"queries": 0, "kept": 0, "escalated": 0, "student_seconds": 0.0, "teacher_seconds": 0.0}

    def stats(self):
        """What run() has done since the last reset_stats():

        queries = kept + escalated; kept_share = kept / queries (None before any query); student_seconds (every
        query), teacher_seconds (the escalated ones), cascade_seconds = their sum; teacher_seconds_per_query: the
        mean of every teacher call seen (calibration and escalations; None when the teacher never ran);
        teacher_only_seconds = that mean x queries, an estimate of what the teacher alone would have taken;
        time_saved_seconds = teacher_only_seconds - cascade_seconds and time_saved_share = that / teacher_only_seconds
        (None without an estimate). evaluate() measures the same without estimating.
        """
        s = dict(self._stats)
        s["kept_share"] = s["kept"] / s["queries"] if s["queries"] else None
        s["cascade_seconds"] = s["student_seconds"] + s["teacher_seconds"]
        per_query = float(np.mean(self._teacher_times)) if self._teacher_times else None
        s["teacher_seconds_per_query"] = per_query
        s["teacher_calls_seen"] = len(self._teacher_times)
        if per_query is None or not s["queries"]:
            s["teacher_only_seconds"] = s["time_saved_seconds"] = s["time_saved_share"] = None
        else:
            s["teacher_only_seconds"] = per_query * s["queries"]
            s["time_saved_seconds"] = s["teacher_only_seconds"] - s["cascade_seconds"]
            s["time_saved_share"] = (s["time_saved_seconds"] / s["teacher_only_seconds"]
                                     if s["teacher_only_seconds"] > 0 else None)
        return s

    # ---------------------------------------------------------------- calibration

    def calibrate(self, validation_queries, agree=None, gold=None, target_agreement=0.95):
        """Choose the threshold on validation data and set it (see the module docstring for the rule).

        Args:
            validation_queries: a non-empty list of queries.
            agree: callable(student_result, reference) -> bool; None = the cascade's `agree`.
            gold: None (the reference is the teacher's answer: the teacher runs on every query) or one reference
                answer per query (the teacher does not run).
            target_agreement: in (0, 1], the share of kept answers that must agree with the reference.

        Returns the report (also kept as `calibration`): threshold, reference ("teacher" | "gold"), queries,
        target_agreement, reached (False when every query escalates), kept_share and agreement_kept at the chosen
        threshold (agreement_kept None when nothing is kept), student_agreement (the student alone, every query),
        cascade_agreement (kept answers that agree plus every escalated one, which is the teacher's own answer;
        None with gold), candidates [(threshold, kept_share, agreement_kept)] for every threshold tried,
        confidences and agreements per query, student_seconds and teacher_seconds (means; teacher None with
        gold), expected_time_saved_share (1 - (student + (1 - kept_share) teacher) / teacher; None with gold).
        """
        queries = _check_queries(validation_queries, "validation_queries")
        gold = _check_gold(gold, len(queries), "validation_queries")
        agree = self.agree if agree is None else _check_agree(agree)
        target = _check_target(target_agreement)
        values, agreements, student_times, teacher_times = [], [], [], []
        for index, query in enumerate(queries):
            student, seconds = self._ask(self._student, "student", query)
            student_times.append(seconds)
            values.append(self._confidence(student))
            if gold is None:
                teacher, seconds = self._ask(self._teacher, "teacher", query)
                teacher_times.append(seconds)
                reference = teacher["result"]
            else:
                reference = gold[index]
            agreements.append(_agrees(agree, student["result"], reference, index))
        self._teacher_times.extend(teacher_times)
        values_array, agree_array = np.array(values), np.array(agreements)
        candidates, chosen = [], None
        for threshold in np.unique(values_array[np.isfinite(values_array)]):
            kept = values_array >= threshold
            share = float(kept.mean())
            rate = float(agree_array[kept].mean())
            candidates.append((float(threshold), share, rate))
            if chosen is None and rate >= target:
                chosen = (float(threshold), share, rate)
        if chosen is None:
            log.warning("calibrate: no threshold keeps student answers that agree with the %s at %.3f on these %d "
                        "queries (the student alone agrees on %d); every query will escalate (threshold inf)",
                        "teacher" if gold is None else "gold answers", target, len(queries), int(agree_array.sum()))
            chosen = (math.inf, 0.0, None)
        kept_mask = values_array >= chosen[0] if chosen[0] != math.inf else np.zeros(len(values), dtype=bool)
        self.threshold = chosen[0]
        student_mean = float(np.mean(student_times))
        teacher_mean = float(np.mean(teacher_times)) if teacher_times else None
        cascade_agreement = None
        expected_saving = None
        if gold is None:
            cascade_agreement = float((agree_array & kept_mask).sum() + (~kept_mask).sum()) / len(queries)
            if teacher_mean:
                expected_saving = 1.0 - (student_mean + (1.0 - chosen[1]) * teacher_mean) / teacher_mean
        self.calibration = {
            "threshold": chosen[0], "reference": "teacher" if gold is None else "gold", "queries": len(queries),
            "target_agreement": target, "reached": chosen[0] != math.inf, "kept_share": chosen[1],
            "agreement_kept": chosen[2], "student_agreement": float(agree_array.mean()),
            "cascade_agreement": cascade_agreement, "candidates": candidates, "confidences": values,
            "agreements": agreements, "student_seconds": student_mean, "teacher_seconds": teacher_mean,
            "expected_time_saved_share": expected_saving}
        return self.calibration

    # ---------------------------------------------------------------- measurement

    def evaluate(self, queries, agree=None, gold=None):
        """Measure the cascade against the teacher alone: both models answer every query (run()'s statistics are
        left alone), and the cascade's answer is the student's where its confidence >= threshold.

        Returns queries, kept_share, escalations, agreement_with_teacher (the cascade's answers that agree with
        the teacher's), student_agreement_with_teacher; with gold also accuracy {"cascade", "student",
        "teacher"}; seconds {"student_only", "teacher_only", "cascade" (student on every query + teacher on the
        escalated ones)} and time_saved_share = 1 - cascade / teacher_only (the teacher's time on kept queries is
        measured here, not estimated).
        """
        if self.threshold is None:
            raise ValueError("the cascade has no threshold: pass threshold= or call calibrate(validation_queries) "
                             "first")
        queries = _check_queries(queries, "queries")
        gold = _check_gold(gold, len(queries), "queries")
        agree = self.agree if agree is None else _check_agree(agree)
        kept, with_teacher, student_with_teacher = [], [], []
        correct = {"cascade": [], "student": [], "teacher": []}
        seconds = {"student_only": 0.0, "teacher_only": 0.0, "cascade": 0.0}
        for index, query in enumerate(queries):
            student, student_seconds = self._ask(self._student, "student", query)
            teacher, teacher_seconds = self._ask(self._teacher, "teacher", query)
            keep = self._keeps(self._confidence(student))
            kept.append(keep)
            student_agrees = _agrees(agree, student["result"], teacher["result"], index)
            student_with_teacher.append(student_agrees)
            with_teacher.append(student_agrees if keep else True)
            if gold is not None:
                correct["student"].append(_agrees(agree, student["result"], gold[index], index))
                correct["teacher"].append(_agrees(agree, teacher["result"], gold[index], index))
                correct["cascade"].append(correct["student"][-1] if keep else correct["teacher"][-1])
            seconds["student_only"] += student_seconds
            seconds["teacher_only"] += teacher_seconds
            seconds["cascade"] += student_seconds + (0.0 if keep else teacher_seconds)
        out = {"queries": len(queries), "threshold": self.threshold, "kept_share": float(np.mean(kept)),
               "escalations": int(len(kept) - sum(kept)), "agreement_with_teacher": float(np.mean(with_teacher)),
               "student_agreement_with_teacher": float(np.mean(student_with_teacher)), "seconds": seconds,
               "time_saved_share": (1.0 - seconds["cascade"] / seconds["teacher_only"]
                                    if seconds["teacher_only"] > 0 else None)}
        if gold is not None:
            out["accuracy"] = {name: float(np.mean(values)) for name, values in correct.items()}
        return out
