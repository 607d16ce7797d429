"""Ranking metrics against values computed by hand, and their input checks."""
import math

import pytest

from hybridrag.retrieval.metrics import (evaluate, mean_reciprocal_rank, ndcg_at_k, precision_at_k, recall_at_k,
                                         reciprocal_rank)

RUN = ["d3", "d1", "d7", "d2", "d9"]
RELEVANT = {"d1", "d2", "d4"}


def test_recall_and_precision_by_hand():
    # d1 at rank 2, d2 at rank 4, d4 never retrieved.
    assert recall_at_k(RUN, RELEVANT, 1) == 0.0
    assert recall_at_k(RUN, RELEVANT, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RUN, RELEVANT, 4) == pytest.approx(2 / 3)
    assert recall_at_k(RUN, RELEVANT, 100) == pytest.approx(2 / 3)
    assert precision_at_k(RUN, RELEVANT, 2) == pytest.approx(1 / 2)
    assert precision_at_k(RUN, RELEVANT, 4) == pytest.approx(2 / 4)
    # Fewer retrieved than k: precision still divides by k.
    assert precision_at_k(RUN, RELEVANT, 10) == pytest.approx(2 / 10)
    assert recall_at_k([], RELEVANT, 3) == 0.0


def test_duplicates_in_the_ranking_count_once_and_close_up():
    # Distinct ranking: d3, d1, d2 -> d2 is at rank 3, inside the top 3.
    ranked = ["d3", "d1", "d1", "d3", "d2"]
    assert recall_at_k(ranked, RELEVANT, 3) == pytest.approx(2 / 3)
    assert precision_at_k(ranked, RELEVANT, 3) == pytest.approx(2 / 3)
    assert precision_at_k(["d1", "d1", "d1"], RELEVANT, 3) == pytest.approx(1 / 3)
    assert reciprocal_rank(["d3", "d3", "d3", "d2"], RELEVANT) == pytest.approx(1 / 2)


def test_reciprocal_rank_by_hand():
    assert reciprocal_rank(RUN, RELEVANT) == pytest.approx(1 / 2)
    assert reciprocal_rank(["d2"], RELEVANT) == 1.0
    assert reciprocal_rank(["x", "y"], RELEVANT) == 0.0
    assert reciprocal_rank(RUN, {"d9"}) == pytest.approx(1 / 5)
    assert reciprocal_rank(RUN, {"d9"}, k=4) == 0.0   # MRR@4 does not see rank 5
    assert reciprocal_rank(RUN, {"d9"}, k=5) == pytest.approx(1 / 5)


def test_ndcg_binary_by_hand():
    # Relevant at ranks 2 and 4: DCG@5 = 1/log2(3) + 1/log2(5); ideal: 3 relevant at ranks 1..3.
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RUN, RELEVANT, 5) == pytest.approx(dcg / idcg)
    # At k=2 the ideal has 2 relevant documents.
    assert ndcg_at_k(RUN, RELEVANT, 2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(["d1", "d2", "d4"], RELEVANT, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["x"], RELEVANT, 1) == 0.0


def test_ndcg_graded_by_hand():
    gains = {"a": 3, "b": 1, "c": 0, "d": 2}      # c has gain 0: not relevant
    ranked = ["b", "c", "a", "e"]
    dcg = 1 / math.log2(2) + 0 + 3 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, gains, 4) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "d", "b"], gains, 3) == pytest.approx(1.0)
    # Graded relevance for recall/RR: positive gain is relevant.
    assert recall_at_k(ranked, gains, 4) == pytest.approx(2 / 3)
    assert reciprocal_rank(["c", "d"], gains) == pytest.approx(1 / 2)


def test_mean_reciprocal_rank_and_evaluate_by_hand():
    run = {"q1": ["d3", "d1", "d7"], "q2": ["x", "y", "z", "w"], "q3": ["a"]}
    qrels = {"q1": {"d1"}, "q2": {"w", "y"}, "q3": {"a", "b"}, "q4": {"zz"}}
    # q1: 1/2, q2: 1/2 (y at rank 2), q3: 1, q4: not in run -> 0.
    assert mean_reciprocal_rank(run, qrels) == pytest.approx((0.5 + 0.5 + 1.0 + 0.0) / 4)
    assert mean_reciprocal_rank(run, qrels, k=1) == pytest.approx((0 + 0 + 1 + 0) / 4)

    out = evaluate(run, qrels, ks=(1, 2))
    assert set(out) == {"recall@1", "precision@1", "ndcg@1", "recall@2", "precision@2", "ndcg@2", "mrr",
                        "num_queries"}
    assert out["num_queries"] == 4.0
    assert out["mrr"] == pytest.approx(0.5)
    assert out["recall@1"] == pytest.approx((0 + 0 + 0.5 + 0) / 4)
    assert out["recall@2"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert out["precision@2"] == pytest.approx((0.5 + 0.5 + 0.5 + 0) / 4)
    ndcg2 = {"q1": (1 / math.log2(3)) / 1.0,
             "q2": (1 / math.log2(3)) / (1 + 1 / math.log2(3)),
             "q3": 1.0 / (1 + 1 / math.log2(3)),
             "q4": 0.0}
    assert out["ndcg@2"] == pytest.approx(sum(ndcg2.values()) / 4)
    assert out["ndcg@1"] == pytest.approx((0 + 0 + 1 + 0) / 4)


def test_evaluate_graded_and_duplicates():
    run = {"q": ["b", "b", "a"]}
    qrels = {"q": {"a": 2, "b": 1}}
    out = evaluate(run, qrels, ks=(2,))
    assert out["recall@2"] == 1.0
    assert out["ndcg@2"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert out["mrr"] == 1.0


@pytest.mark.parametrize("call, error, match", [
    (lambda: recall_at_k(RUN, RELEVANT, 0), ValueError, r"k must be >= 1, got 0"),
    (lambda: precision_at_k(RUN, RELEVANT, -2), ValueError, r"k must be >= 1, got -2"),
    (lambda: ndcg_at_k(RUN, RELEVANT, 2.0), TypeError, r"k must be an int >= 1, got float 2.0"),
    (lambda: recall_at_k(RUN, RELEVANT, True), TypeError, r"k must be an int >= 1, got bool True"),
    (lambda: reciprocal_rank(RUN, RELEVANT, k=0), ValueError, r"k must be >= 1, got 0"),
    (lambda: recall_at_k(RUN, set(), 3), ValueError, r"relevant has no relevant id \(empty"),
    (lambda: ndcg_at_k(RUN, {"d1": 0, "d2": 0.0}, 3), ValueError, r"relevant has no relevant id"),
    (lambda: ndcg_at_k(RUN, {"d1": -1}, 3), ValueError, r"maps 'd1' to -1; gains must be finite and >= 0"),
    (lambda: ndcg_at_k(RUN, {"d1": float("nan")}, 3), ValueError, r"maps 'd1' to nan; gains must be finite"),
    (lambda: ndcg_at_k(RUN, {"d1": "high"}, 3), TypeError, r"maps 'd1' to 'high'; gains must be int or float"),
    (lambda: recall_at_k(RUN, "d1", 3), TypeError, r"relevant must be a collection of ids .* got a str 'd1'"),
    (lambda: recall_at_k("d1 d2", RELEVANT, 3), TypeError, r"retrieved must be a sequence of ids .* got str"),
    (lambda: recall_at_k({"d1"}, RELEVANT, 3), TypeError, r"retrieved must be a sequence of ids .* got set"),
    (lambda: reciprocal_rank(RUN, 5), TypeError, r"relevant must be a collection of ids .* got int"),
])
def test_bad_input_for_one_query(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("run, qrels, ks, error, match", [
    ({"q1": ["a"]}, {"q1": set()}, (1,), ValueError, r"relevant for query 'q1' has no relevant id"),
    ({"q1": ["a"], "q9": ["b"]}, {"q1": {"a"}}, (1,), ValueError, r"run has 1 queries without qrels .*'q9'"),
    ({"q1": ["a"]}, {}, (1,), ValueError, r"qrels is empty"),
    ({"q1": ["a"]}, {"q1": {"a"}}, (), ValueError, r"ks must name at least one cutoff"),
    ({"q1": ["a"]}, {"q1": {"a"}}, (1, 0), ValueError, r"every k in ks must be >= 1, got 0"),
    ({"q1": "a b"}, {"q1": {"a"}}, (1,), TypeError, r"run\['q1'\] must be a sequence of doc ids, got str"),
    ([["a"]], {"q1": {"a"}}, (1,), TypeError, r"run must be a mapping query id -> ranked list"),
    ({"q1": ["a"]}, [{"a"}], (1,), TypeError, r"qrels must be a mapping query id -> relevant ids"),
])
def test_bad_input_for_a_run(run, qrels, ks, error, match):
    with pytest.raises(error, match=match):
        evaluate(run, qrels, ks=ks)


def test_mean_reciprocal_rank_checks_like_evaluate():
    with pytest.raises(ValueError, match=r"relevant for query 'q2' has no relevant id"):
        mean_reciprocal_rank({"q1": ["a"]}, {"q1": {"a"}, "q2": []})
    with pytest.raises(ValueError, match=r"k must be >= 1, got 0"):
        mean_reciprocal_rank({"q1": ["a"]}, {"q1": {"a"}}, k=0)
