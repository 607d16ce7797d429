"""benchmarks/data/pydoc_qa.jsonl: questions with short gold answers over Python's bundled docs
(`pydoc_data.topics.topics`), each answerable from one topic's text; and the answer metrics of
hybridrag.system.evaluation that score it.

The set's rules, checked here: answers (normalised) occur in their topic's text (normalised); questions are
paraphrases, sharing no MAX_SHARED_RUN consecutive words with their topic nor with any retrieval query of
benchmarks/data/pydoc_queries.jsonl (the two sets stay apart).
"""
import collections
import json
import re
from pathlib import Path

import pytest

from hybridrag.system.evaluation import (contains_gold, exact_match, normalize_answer, score_answer, summarize,
                                         token_f1)

pydoc_topics = pytest.importorskip("pydoc_data.topics").topics

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
MAX_SHARED_RUN = 8


def load(name):
    rows = []
    with (DATA / name).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            assert line.strip(), f"{name}:{number} is blank"
            rows.append(json.loads(line))
    return rows


ROWS = load("pydoc_qa.jsonl")


def runs(text, n=MAX_SHARED_RUN):
    words = normalize_answer(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


# --- the question set ---

def test_schema_size_and_unique_ids():
    assert len(ROWS) >= 40
    for row in ROWS:
        assert set(row) == {"id", "question", "answers", "topic"}, row
        assert re.fullmatch(r"qa\d{3}", row["id"]), row["id"]
        assert isinstance(row["question"], str) and row["question"] == row["question"].strip(), row
        assert row["question"].endswith("?"), row["id"]
        assert isinstance(row["answers"], list) and row["answers"], row
        assert all(isinstance(answer, str) and answer for answer in row["answers"]), row
        assert isinstance(row["topic"], str), row
    ids = [row["id"] for row in ROWS]
    assert len(set(ids)) == len(ids), [i for i, c in collections.Counter(ids).items() if c > 1]
    questions = [normalize_answer(row["question"]) for row in ROWS]
    assert len(set(questions)) == len(questions), [q for q, c in collections.Counter(questions).items() if c > 1]


def test_answers_are_short():
    long = [(row["id"], answer) for row in ROWS for answer in row["answers"] if len(answer.split()) > 5]
    assert not long, f"answers over 5 words: {long}"


def test_topics_exist_and_are_spread():
    missing = [(row["id"], row["topic"]) for row in ROWS if row["topic"] not in pydoc_topics]
    assert not missing, f"topics missing from pydoc_data.topics: {missing}"
    assert len({row["topic"] for row in ROWS}) >= 30


def test_every_answer_occurs_in_its_topic():
    absent = []
    for row in ROWS:
        text = f" {normalize_answer(pydoc_topics[row['topic']])} "
        for answer in row["answers"]:
            if f" {normalize_answer(answer)} " not in text:
                absent.append((row["id"], answer))
    assert not absent, f"answers not found (as whole words, normalised) in their topic's text: {absent}"


def test_the_copy_detector_catches_a_pasted_sentence():
    text = pydoc_topics["break"]
    pasted = " ".join(normalize_answer(text).split()[10:22])
    assert runs(pasted) & runs(text)
    assert not runs("After a for loop is exited with break, what value does the loop's target variable hold?") \
        & runs(text)


def test_questions_are_not_copied_from_their_topic():
    copies = [(row["id"], " ".join(sorted(runs(row["question"]) & runs(pydoc_topics[row["topic"]]))[0]))
              for row in ROWS if runs(row["question"]) & runs(pydoc_topics[row["topic"]])]
    assert not copies, f"questions sharing {MAX_SHARED_RUN}+ consecutive words with their topic: {copies}"


def test_questions_are_apart_from_the_retrieval_queries():
    queries = load("pydoc_queries.jsonl")
    query_runs = set().union(*(runs(query["query"]) for query in queries))
    query_texts = {normalize_answer(query["query"]) for query in queries}
    shared = [row["id"] for row in ROWS if runs(row["question"]) & query_runs]
    assert not shared, f"questions sharing {MAX_SHARED_RUN}+ consecutive words with a retrieval query: {shared}"
    same = [row["id"] for row in ROWS if normalize_answer(row["question"]) in query_texts]
    assert not same, f"questions identical to a retrieval query: {same}"


# --- the metrics ---

def test_normalize_answer():
    assert normalize_answer("  The  Answer, is: AN apple! ") == "answer is apple"
    assert normalize_answer("“dunder”") == "dunder"          # Unicode quotes are punctuation too
    assert normalize_answer("__init__") == "init"
    assert normalize_answer("utf-8") == "utf8"
    assert normalize_answer("theory") == "theory"            # articles only as whole words
    assert normalize_answer("") == ""
    with pytest.raises(TypeError, match="text must be a str"):
        normalize_answer(None)


def test_exact_match():
    assert exact_match("The NameError.", "NameError") == 1.0
    assert exact_match("nameerror", ["KeyError", "NameError"]) == 1.0
    assert exact_match("It raises NameError", "NameError") == 0.0


def test_contains_gold_matches_whole_words():
    assert contains_gold("It raises a NameError here.", "NameError") == 1.0
    assert contains_gold("the answer is 10", "1") == 0.0
    assert contains_gold("exactly one object", ["two", "exactly one"]) == 1.0
    assert contains_gold("", "x") == 0.0


def test_token_f1():
    assert token_f1("NameError", "NameError") == 1.0
    assert token_f1("it returns None", "None") == pytest.approx(0.5)      # precision 1/3, recall 1
    assert token_f1("left to right", ["right to left", "nope"]) == 1.0     # a bag of words
    assert token_f1("from left", "from left to right") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("", "x") == 0.0
    assert token_f1("x y z", ["z", "x y"]) == pytest.approx(0.8)           # the best gold: p 2/3, r 1


def test_score_answer_and_summarize():
    first = score_answer("It returns None.", ["None"])
    assert first == {"exact_match": 0.0, "contains_gold": 1.0, "token_f1": pytest.approx(0.5)}
    second = score_answer("None", "None")
    assert second == {"exact_match": 1.0, "contains_gold": 1.0, "token_f1": 1.0}
    third = score_answer("KeyError", "NameError")
    summary = summarize([first, second, {**third, "id": "q3"}])
    assert summary["count"] == 3
    assert summary["exact_match"] == pytest.approx(1 / 3)
    assert summary["contains_gold"] == pytest.approx(2 / 3)
    assert summary["token_f1"] == pytest.approx(0.5)
    assert summary["exact_match_count"] == 1 and summary["contains_gold_count"] == 2


def test_metric_arguments_are_checked():
    with pytest.raises(TypeError, match="golds must be a str or a non-empty list"):
        exact_match("x", [])
    with pytest.raises(TypeError, match=r"golds\[1\] must be a str"):
        contains_gold("x", ["x", 3])
    with pytest.raises(ValueError, match=r"golds\[0\] is 'The'.*empty once normalised"):
        token_f1("x", "The")
    with pytest.raises(TypeError, match="prediction must be a str"):
        score_answer(None, "x")
    with pytest.raises(ValueError, match="non-empty list"):
        summarize([])
    with pytest.raises(ValueError, match=r"scores\[0\] lacks \['token_f1'\]"):
        summarize([{"exact_match": 1.0, "contains_gold": 1.0}])


def test_every_gold_scores_one_against_itself():
    for row in ROWS:
        for answer in row["answers"]:
            assert score_answer(answer, row["answers"]) == {"exact_match": 1.0, "contains_gold": 1.0,
                                                            "token_f1": 1.0}, (row["id"], answer)
