"""benchmarks/data/pydoc_queries.jsonl: hand-written questions over Python's bundled language reference
(`pydoc_data.topics.topics`, 79 topic key -> help text), each labelled with the topic keys whose text answers it.

Labelling rule: the most specific topic comes first; a topic whose text contains a labelled topic's text verbatim
(CONTAINED_IN below, e.g. every "try" paragraph is also in "compound") is labelled too, so a retriever is not
penalised for returning the larger page. Split rule: queries ordered by (first label, id); positions 0 and 2 of every
5 are "train" (40 %), the rest "test", which spreads both splits over the topics.
"""
import collections
import json
import re
import sys
from pathlib import Path

import pytest

pydoc_topics = pytest.importorskip("pydoc_data.topics").topics

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "pydoc_queries.jsonl"
MAX_SHARED_RUN = 8      # a query may not share this many consecutive words with a topic it is labelled with

# topic -> topics that contain every paragraph of its text (checked below on the running Python).
CONTAINED_IN = {
    "async": ["compound"], "class": ["compound"], "for": ["compound"], "function": ["compound"],
    "if": ["else", "compound"], "else": ["if", "compound"], "try": ["compound"], "while": ["compound"],
    "with": ["compound"],
    "attribute-access": ["specialnames"], "callable-types": ["specialnames"], "context-managers": ["specialnames"],
    "customization": ["specialnames"], "numeric-types": ["specialnames"], "sequence-types": ["specialnames"],
    "augassign": ["assignment"], "dynamic-features": ["naming", "execmodel"], "exceptions": ["execmodel"],
    "naming": ["execmodel"], "id-classes": ["identifiers"], "in": ["comparisons"], "typesseq-mutable": ["typesseq"],
}
_WORD = re.compile(r"[a-z0-9]+")


def load():
    rows = []
    with PATH.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            assert line.strip(), f"{PATH.name}:{number} is blank"
            rows.append(json.loads(line))
    return rows


ROWS = load()


def words(text):
    """Lowercase alphanumeric words: punctuation and layout do not matter."""
    return _WORD.findall(text.lower())


def runs(text, n=MAX_SHARED_RUN):
    ws = words(text)
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def paragraphs(text):
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 80]


def test_schema_ids_and_size():
    assert len(ROWS) >= 120
    for row in ROWS:
        assert set(row) == {"id", "query", "relevant", "split"}, row
        assert re.fullmatch(r"q\d{3}", row["id"]), row["id"]
        assert isinstance(row["query"], str) and row["query"].strip() == row["query"] and row["query"], row
        assert isinstance(row["relevant"], list) and row["relevant"], row
        assert all(isinstance(label, str) for label in row["relevant"]), row
        assert len(set(row["relevant"])) == len(row["relevant"]), f"{row['id']} repeats a label"
        assert row["split"] in ("train", "test"), row
    ids = [row["id"] for row in ROWS]
    assert len(set(ids)) == len(ids), [i for i, c in collections.Counter(ids).items() if c > 1]
    queries = [" ".join(words(row["query"])) for row in ROWS]
    assert len(set(queries)) == len(queries), [q for q, c in collections.Counter(queries).items() if c > 1]


def test_every_label_is_a_topic_of_this_python():
    missing = collections.defaultdict(list)
    for row in ROWS:
        for label in row["relevant"]:
            if label not in pydoc_topics:
                missing[label].append(row["id"])
    assert not missing, (f"topic keys missing from pydoc_data.topics on Python {sys.version.split()[0]}: "
                         f"{dict(missing)} (key -> queries using it)")


def test_coverage_of_topics():
    labelled = {label for row in ROWS for label in row["relevant"]}
    assert len(labelled) >= 60
    first = collections.Counter(row["relevant"][0] for row in ROWS)
    assert len(first) >= 60
    # Common topics get several queries.
    for topic in ("try", "formatstrings", "string-methods", "typesmapping", "function", "debugger"):
        assert first[topic] >= 4, (topic, first[topic])


def test_splits_follow_the_rule_and_spread_over_topics():
    order = sorted(ROWS, key=lambda row: (row["relevant"][0], row["id"]))
    for position, row in enumerate(order):
        assert row["split"] == ("train" if position % 5 in (0, 2) else "test"), row["id"]
    share = sum(row["split"] == "train" for row in ROWS) / len(ROWS)
    assert 0.35 <= share <= 0.45, share
    for split in ("train", "test"):
        topics = {row["relevant"][0] for row in ROWS if row["split"] == split}
        assert len(topics) >= 40, (split, len(topics))


def test_labels_include_the_topics_that_contain_a_label_verbatim():
    for row in ROWS:
        for label in row["relevant"]:
            for parent in CONTAINED_IN.get(label, []):
                assert parent in row["relevant"], f"{row['id']}: labelled {label!r} but not {parent!r}, which " \
                                                  f"contains {label!r}'s text"


def test_containment_map_holds_on_this_python():
    broken = []
    for child, parents in CONTAINED_IN.items():
        for parent in parents:
            if child in pydoc_topics and parent in pydoc_topics:
                missing = [p for p in paragraphs(pydoc_topics[child]) if p not in pydoc_topics[parent]]
                if missing:
                    broken.append((child, parent, len(missing)))
    assert not broken, (f"on Python {sys.version.split()[0]} these topics are no longer contained in their "
                        f"parents (child, parent, paragraphs missing): {broken}; revise CONTAINED_IN and the labels")


def test_the_copy_detector_catches_a_pasted_sentence():
    text = pydoc_topics["try"]
    sentence = " ".join(words(text)[40:52])
    assert runs(sentence) & runs(text)
    # A paraphrase is not flagged.
    assert not runs("how do I run cleanup code even if an error happens") & runs(text)


def test_queries_are_not_copies_of_their_topics():
    copies = []
    topic_runs = {}
    for row in ROWS:
        for label in row["relevant"]:
            if label not in pydoc_topics:
                continue          # reported by test_every_label_is_a_topic_of_this_python
            if label not in topic_runs:
                topic_runs[label] = runs(pydoc_topics[label])
            shared = runs(row["query"]) & topic_runs[label]
            if shared:
                copies.append((row["id"], label, " ".join(sorted(shared)[0])))
    assert not copies, f"queries sharing {MAX_SHARED_RUN}+ consecutive words with a labelled topic: {copies}"
