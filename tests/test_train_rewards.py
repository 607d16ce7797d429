"""hybridrag.train.rewards: the lexical hallucination check against the passages' text, and the RAG reward's
components and total."""
import pytest

from hybridrag.retrieval import Document
from hybridrag.train.rewards import DEFAULT_WEIGHTS, check_hallucination, compute_rag_reward, split_sentences

DOCS = [Document("assert", "The assert statement raises AssertionError when its condition is false; __debug__ is "
                 "True unless Python runs with -O.", "assert"),
        Document("power", "Raising 0.0 to a negative power results in a ZeroDivisionError. 10**2 returns 100.",
                 "power")]


def test_supported_claims():
    report = check_hallucination("An assert raises AssertionError when the condition is false [DOC_1]. "
                                 "10**2 returns 100.", DOCS)
    assert not report["hallucinated"] and report["score"] == 0.0 and len(report["claims"]) == 2
    first, second = report["claims"]
    assert first["best_passage"] == 0 and first["cited"] == [1] and first["cited_support"] == {1: 1.0}
    assert second["best_passage"] == 1 and second["supported"]


def test_unsupported_claims_numbers_and_entities():
    report = check_hallucination("Assert raises AssertionError. It was added in Python 2.7 by Guido. "
                                 "Loops iterate over generators lazily.", DOCS)
    assert report["hallucinated"] and report["score"] == pytest.approx(2 / 3)
    assert report["unsupported_claims"] == ["It was added in Python 2.7 by Guido.",
                                            "Loops iterate over generators lazily."]
    assert report["unsupported_numbers"] == ["2.7"] and report["unsupported_entities"] == ["Guido"]
    # a claim whose words all occur but whose number does not is unsupported
    assert check_hallucination("10**2 returns 1000.", DOCS)["unsupported_numbers"] == ["1000"]


def test_citation_number_does_not_make_a_claim_supported():
    report = check_hallucination("Floats are rounded to even digits [DOC_2].", DOCS)
    assert report["hallucinated"] and report["claims"][0]["cited_support"][2] < 0.5


def test_edge_cases():
    empty = check_hallucination("", DOCS)
    assert (empty["hallucinated"], empty["score"], empty["claims"], empty["sentences"]) == (False, 0.0, [], 0)
    assert check_hallucination("Yes. It is.", DOCS)["claims"] == []  # no content word: no claim
    alone = check_hallucination("Assert raises AssertionError.", [])
    assert alone["hallucinated"] and alone["claims"][0]["best_passage"] is None
    assert split_sentences("One. Two!\nThree? 3.5 stays") == ["One.", "Two!", "Three?", "3.5 stays"]
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\], got 0"):
        check_hallucination("a", DOCS, threshold=0)
    with pytest.raises(TypeError, match="answer must be a str, got NoneType"):
        check_hallucination(None, DOCS)


def test_reward_components_and_total():
    good = compute_rag_reward("Assert raises AssertionError [DOC_1].", "AssertionError", DOCS)
    assert good["components"] == {"correctness": 1.0, "citation": 1.0, "unsupported": 0.0, "length": 0.0,
                                  "empty": 0.0}
    assert good["total"] == pytest.approx(1.0 + 0.3) and good["weights"] == DEFAULT_WEIGHTS
    # cites a passage it was not given and one that does not support it
    bad_cite = compute_rag_reward("Assert raises AssertionError [DOC_2][DOC_7].", ["AssertionError"], DOCS)
    assert bad_cite["components"]["citation"] == 0.0
    half = compute_rag_reward("Assert raises AssertionError [DOC_1, DOC_9].", ["AssertionError"], DOCS)
    assert half["components"]["citation"] == 0.5
    wrong = compute_rag_reward("It raises ValueError in Python 2.7.", ["AssertionError"], DOCS)
    assert wrong["components"]["correctness"] == 0.0 and wrong["components"]["unsupported"] == 1.0
    assert wrong["total"] == pytest.approx(-0.5)


def test_length_empty_and_weights():
    long = compute_rag_reward("AssertionError " + "assert " * 20, "AssertionError", DOCS, max_words=7)
    assert long["components"]["length"] == 1.0
    empty = compute_rag_reward("", "AssertionError", DOCS)
    assert empty["components"]["empty"] == 1.0 and empty["total"] == pytest.approx(-1.0)
    weighted = compute_rag_reward("", "AssertionError", DOCS, weights={"empty": 0.25})
    assert weighted["total"] == pytest.approx(-0.25) and weighted["weights"]["correctness"] == 1.0


@pytest.mark.parametrize("options, error, match", [
    ({"weights": {"style": 1.0}}, ValueError, r"weights has unknown components \['style'\]"),
    ({"weights": {"citation": -1}}, ValueError, r"weights\['citation'\] must be a number >= 0, got -1"),
    ({"weights": [1.0]}, TypeError, "weights must be a dict"),
    ({"max_words": 0}, ValueError, "max_words must be an int >= 1, got 0")])
def test_reward_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        compute_rag_reward("a", "a", DOCS, **options)


def test_reward_bad_gold_and_answer():
    with pytest.raises(ValueError, match="golds\\[0\\] is 'the'"):
        compute_rag_reward("anything", "the", DOCS)
    with pytest.raises(TypeError, match="answer must be a str, got int"):
        compute_rag_reward(3, "a", DOCS)
    with pytest.raises(TypeError, match="documents must be a list"):
        compute_rag_reward("a", "a", "text")
