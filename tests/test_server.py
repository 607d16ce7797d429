"""The HTTP server, run as users run it: `python -m hybridrag serve` in a subprocess on a free loopback port, over
the real offline model. Every endpoint, bad input, auth, the order of streamed tokens, a full queue (429), a client
that disconnects mid-stream, a timeout (504), the cascade and the document generator (trained here by
`hybridrag train-generator` on the served knowledge base), and a SIGKILL during a knowledge-base update followed by
a restart."""
import json
import os
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from pydoc_data.topics import topics
from schemathesis.checks import response_schema_conformance
from server_process import KEY, Server

TOPICS = ["assert", "for", "while", "pass"]
QUESTION = "What does an assert statement raise when its condition is false?"
FUZZ_EXAMPLES = 3  # per operation (plus the explicit examples): about 40 s for the whole schema on 2 cores


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    docs = root / "docs"
    docs.mkdir()
    for name in TOPICS:
        (docs / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    config = root / "config.json"
    config.write_text(json.dumps({"encoder": "hashing-256", "retriever": {"top_k": 2},
                                  "generation": {"max_new_tokens": 6}, "attention_feedback": True}))
    return root, docs, config


@pytest.fixture(scope="module")
def server(folder):
    """The state folder built from the documents (as `serve --docs` builds it; no model needed), a document
    generator trained on its knowledge base, then the server."""
    from hybridrag.cli import main
    from hybridrag.server import open_system
    from hybridrag.system import SystemConfig, load_documents

    root, docs, config = folder
    from hybridrag.encoders import HybridEncoder, HybridEncoderConfig

    open_system(root / "state", load_documents(docs), SystemConfig.from_any(config))
    generator = root / "generator.pt"
    assert main(["train-generator", "--kb", str(root / "state"), "--out", str(generator), "--steps", "20",
                 "--length", "24"]) == 0
    encoder = HybridEncoder(HybridEncoderConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64,
                                                output_dim=64)).save(root / "hybrid-encoder.pt")
    running = Server(root / "state", "--queue", "1", "--generator", str(generator), "--hybrid-encoder", str(encoder))
    yield running
    running.stop()


def post(server, path, body, **options):
    return httpx.post(server.url + path, json=body, timeout=120, **options)


def test_health_schema_and_stats(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["passages"] >= len(TOPICS)
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/query", "/query/hybrid", "/stream/query", "/documents", "/documents/remove", "/retention/update",
            "/diffusion/generate", "/distillation/cascade", "/hybrid/stats", "/health"} <= set(paths)
    stats = httpx.get(server.url + "/hybrid/stats").json()
    assert stats["documents"] == len(TOPICS) and stats["queue"]["capacity"] == 1


def test_query_answers_from_the_passages(server):
    reply = post(server, "/query", {"question": QUESTION})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["method"] == "base_rag" and body["success"] and body["response"].strip()
    assert body["passages"][0]["id"].startswith("assert.txt#")
    assert all(p["attention_mass"] is not None for p in body["passages"]) and body["citations"]
    assert body["encoder"] == "hashing-256"
    hybrid = post(server, "/query/hybrid", {"question": QUESTION}).json()
    assert hybrid["method"] == "hybrid" and hybrid["request_id"] != body["request_id"]
    assert hybrid["encoder"].startswith("HybridEncoder-")  # from the --hybrid-encoder's index
    direct = post(server, "/query", {"question": QUESTION, "method": "direct"}).json()
    assert direct["method"] == "direct" and direct["passages"] == []


def read_events(lines):
    """(name, data) of each server-sent event of an iterator of lines."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: "):])


def test_streamed_tokens_come_in_order_and_make_the_answer(server):
    with httpx.stream("POST", server.url + "/stream/query", json={"question": QUESTION, "method": "hybrid"},
                      timeout=120) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(reply.iter_lines()))
    tokens = [data for name, data in events if name == "token"]
    (done,) = [data for name, data in events if name == "done"]
    assert [t["i"] for t in tokens] == list(range(len(tokens))) and len(tokens) >= 1
    assert "".join(t["text"] for t in tokens) == done["response"] and done["method"] == "hybrid"
    assert events[-1][0] == "done"


@pytest.mark.parametrize("body, field", [
    ({"question": ""}, "question"), ({"question": "   "}, "question"), ({"question": 3}, "question"),
    ({"question": "x", "method": "fast"}, "method"), ({"question": "x", "top_k": 2}, "top_k"), ({}, "question")])
def test_bad_queries_are_422_naming_the_field(server, body, field):
    reply = post(server, "/query", body)
    assert reply.status_code == 422
    assert any(error["loc"][-1] == field for error in reply.json()["detail"]), reply.text


def test_a_body_over_the_limit_is_413(server):
    reply = post(server, "/documents", {"documents": [{"id": "big", "text": "x" * 3_000_000}]},
                 headers={"X-API-Key": KEY})
    assert reply.status_code == 413 and "limit" in reply.json()["detail"]


def test_state_changing_endpoints_need_the_key(server):
    body = {"documents": [{"id": "with", "text": topics["with"]}]}
    assert post(server, "/documents", body).status_code == 401
    assert post(server, "/documents", body, headers={"X-API-Key": "wrong-key-000"}).status_code == 401
    assert post(server, "/documents/remove", {"ids": ["assert.txt"]}).status_code == 401
    assert post(server, "/retention/update", {"passage_ids": ["x"], "feedback": [1.0]}).status_code == 401
    assert httpx.get(server.url + "/documents").status_code == 200  # reading needs no key


def test_documents_are_added_found_and_removed(server):
    headers = {"X-API-Key": KEY}
    added = post(server, "/documents", {"documents": [{"id": "with", "text": topics["with"], "title": "with"}]},
                 headers=headers)
    assert added.status_code == 200, added.text
    assert added.json()["documents"] == 1 and added.json()["passages"] >= 1
    listed = {d["id"]: d for d in httpx.get(server.url + "/documents").json()["documents"]}
    assert listed["with"]["title"] == "with" and listed["with"]["passages"] == added.json()["passages"]
    found = post(server, "/query/hybrid", {"question": "with statement __enter__ __exit__ context manager"}).json()
    assert any(p["id"].startswith("with#") for p in found["passages"])  # the hybrid index was kept in step
    again = post(server, "/documents", {"documents": [{"id": "with", "text": "again"}]}, headers=headers)
    assert again.status_code == 422 and "already in the knowledge base" in json.dumps(again.json())
    assert httpx.get(server.url + "/hybrid/stats").json()["passages"] == added.json()["total_passages"]
    removed = post(server, "/documents/remove", {"ids": ["with", "nope"]}, headers=headers).json()
    assert removed["documents"] == 1 and removed["passages"] == added.json()["passages"]
    assert "with" not in {d["id"] for d in httpx.get(server.url + "/documents").json()["documents"]}


def test_retention_update_moves_the_weights(server):
    headers = {"X-API-Key": KEY}
    passage = post(server, "/query", {"question": QUESTION}).json()["passages"][0]["id"]
    moved = post(server, "/retention/update", {"passage_ids": [passage], "feedback": [1.0]}, headers=headers)
    assert moved.status_code == 200 and moved.json()["weights"][passage] > 1.0
    bad = post(server, "/retention/update", {"passage_ids": [passage, "nope#0"], "feedback": [1.0, 0.5]},
               headers=headers)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "passage_ids"]
    uneven = post(server, "/retention/update", {"passage_ids": [passage], "feedback": [1.0, 0.5]}, headers=headers)
    assert uneven.status_code == 422 and uneven.json()["detail"][0]["loc"] == ["body", "feedback"]


def test_the_cascade_keeps_confident_answers_and_escalates_the_rest(server):
    before = httpx.get(server.url + "/hybrid/stats").json()["cascade"]
    kept = post(server, "/distillation/cascade", {"question": QUESTION, "threshold": 0})
    assert kept.status_code == 200, kept.text
    kept = kept.json()
    assert kept["answered_by"] == "student" and not kept["escalated"] and kept["seconds"]["teacher"] == 0
    assert kept["answer"]["method"] == "base_rag" and len(kept["answer"]["passages"]) == 1
    assert kept["answer"]["response"] == kept["student_response"] and kept["confidence"] >= 0
    escalated = post(server, "/distillation/cascade", {"question": QUESTION, "threshold": 1e6}).json()
    assert escalated["answered_by"] == "teacher" and escalated["escalated"] and escalated["seconds"]["teacher"] > 0
    assert escalated["answer"]["method"] == "hybrid" and len(escalated["answer"]["passages"]) == 2  # top_k
    assert escalated["confidence"] == pytest.approx(kept["confidence"]) and escalated["student_response"]
    after = httpx.get(server.url + "/hybrid/stats").json()["cascade"]
    assert after["queries"] - before["queries"] == 2 and after["kept"] - before["kept"] == 1
    assert after["escalated"] - before["escalated"] == 1
    for body in ({"question": QUESTION}, {"question": QUESTION, "threshold": -1}):  # no server default; negative
        reply = post(server, "/distillation/cascade", body)
        assert reply.status_code == 422 and reply.json()["detail"][0]["loc"][-1] == "threshold", reply.text


def test_generated_passages_are_scored_and_added_as_synthetic_documents(server):
    headers = {"X-API-Key": KEY}
    body = {"condition": "what does the assert statement raise", "num_samples": 3, "seed": 1}
    reply = post(server, "/diffusion/generate", body)
    assert reply.status_code == 200, reply.text
    samples = reply.json()["samples"]
    assert 1 <= len(samples) <= 3 and reply.json()["added"] == []
    assert all(s["accepted"] and s["text"].strip() and -1 <= s["similarity"] <= 1 for s in samples)
    assert post(server, "/diffusion/generate", {**body, "add": True}).status_code == 401  # adding needs the key
    added = post(server, "/diffusion/generate", {**body, "add": True}, headers=headers).json()
    assert added["added"] == [f"synthetic-{i}" for i in range(len(samples))]
    assert [s["text"] for s in added["samples"]] == [s["text"] for s in samples]  # the seed decides
    listed = {d["id"]: d for d in httpx.get(server.url + "/documents").json()["documents"]}
    assert all(listed[i]["synthetic"] for i in added["added"]) and not listed["assert.txt"]["synthetic"]
    again = post(server, "/diffusion/generate", {**body, "num_samples": 1, "add": True}, headers=headers).json()
    assert again["added"] == [f"synthetic-{len(samples)}"]
    strict = post(server, "/diffusion/generate", {**body, "min_similarity": 1.0, "add": True}, headers=headers).json()
    assert not any(s["accepted"] for s in strict["samples"]) and strict["added"] == []
    copies = post(server, "/diffusion/generate", {**body, "authentic": True}).json()["samples"]
    assert [s["text"] for s in copies] == [s["text"] for s in samples]
    for sample in copies:  # the copy test: accepted exactly when no more similar than its neighbour's neighbour
        assert -1 <= sample["copy_bound"] <= 1 and sample["accepted"] == \
            (sample["corpus_similarity"] <= sample["copy_bound"]), sample
    assert all(s["copy_bound"] is None for s in samples)
    removed = post(server, "/documents/remove", {"ids": added["added"] + again["added"]}, headers=headers).json()
    assert removed["documents"] == len(samples) + 1
    for bad, field in (({"condition": " "}, "condition"), ({"condition": "x", "num_samples": 0}, "num_samples"),
                       ({"condition": "x", "temperature": -1}, "temperature")):
        reply = post(server, "/diffusion/generate", bad)
        assert reply.status_code == 422 and reply.json()["detail"][0]["loc"][-1] == field, reply.text


def test_a_full_queue_answers_429_and_loses_no_accepted_request(server):
    """Queue of 1: of six requests sent at once, one runs, one waits and the rest find the queue full; every
    accepted request is answered exactly once."""
    before = httpx.get(server.url + "/hybrid/stats").json()["queue"]
    replies = [None] * 6

    def ask(slot):
        replies[slot] = post(server, "/query", {"question": f"{QUESTION} ({slot})"})

    threads = [threading.Thread(target=ask, args=(slot,)) for slot in range(len(replies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in replies)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
    for reply in replies:
        if reply.status_code == 429:
            assert int(reply.headers["Retry-After"]) >= 1 and "queue is full" in reply.json()["detail"]
    answered = [r.json()["request_id"] for r in replies if r.status_code == 200]
    assert len(set(answered)) == len(answered)
    after = httpx.get(server.url + "/hybrid/stats").json()["queue"]
    assert after["accepted"] - before["accepted"] == len(answered)
    assert after["completed"] - before["completed"] == len(answered)
    assert after["rejected"] - before["rejected"] == statuses.count(429)


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    before = httpx.get(server.url + "/hybrid/stats").json()["queue"]
    with httpx.stream("POST", server.url + "/stream/query", json={"question": QUESTION}, timeout=120) as reply:
        for name, _ in read_events(reply.iter_lines()):
            if name == "token":
                break  # leave after the first token: the connection closes here
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue = httpx.get(server.url + "/hybrid/stats").json()["queue"]
        if queue["cancelled"] > before["cancelled"] or queue["completed"] > before["completed"]:
            break
        time.sleep(0.2)
    assert queue["cancelled"] == before["cancelled"] + 1, queue  # stopped, not run to the end
    assert post(server, "/query", {"question": QUESTION}).status_code == 200  # and the server goes on


def test_a_request_past_its_timeout_is_504_and_stopped(server):
    before = httpx.get(server.url + "/hybrid/stats").json()["queue"]
    reply = post(server, "/query", {"question": QUESTION, "timeout_s": 0.05})
    assert reply.status_code == 504 and "no answer within 0.05 s" in reply.json()["detail"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the worker stops it at its next token
        queue = httpx.get(server.url + "/hybrid/stats").json()["queue"]
        if queue["running"] == queue["pending"] == 0:
            break
        time.sleep(0.1)
    assert queue["timed_out"] == before["timed_out"] + 1 and queue["completed"] == before["completed"]
    assert queue["cancelled"] == before["cancelled"] + 1
    assert post(server, "/query", {"question": QUESTION, "timeout_s": 0}).status_code == 422


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def no_internal_error(ctx, response, case):
    """No 5xx but the documented 504 of an answer past its time limit (a fuzzed timeout_s may be 5e-324 s)."""
    timed_out = response.status_code == 504 and "no answer within" in response.text
    assert response.status_code < 500 or timed_out, f"{response.status_code}: {response.text[:500]}"


@schemathesis.pytest.from_fixture("api_schema").parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_from_the_schema_never_get_a_500(case):
    """Every operation with bodies drawn from its OpenAPI schema (and the key, so the state-changing ones run
    too): no internal error, and each documented response matches its schema. Runs after the tests above: it adds
    documents."""
    response = case.call(headers={"X-API-Key": KEY}, timeout=120)
    case.validate_response(response, checks=[no_internal_error, response_schema_conformance])


def test_killed_during_an_update_it_restarts_consistent(folder, tmp_path):
    """SIGKILL while batches of documents are being added one after another: the restarted server holds the
    documents of before plus whole batches (each add is all or nothing, and so is its save), and answers."""
    root, docs, config = folder
    state = tmp_path / "state"
    first = Server(state, docs=docs, config=config)
    before = {d["id"] for d in httpx.get(first.url + "/documents").json()["documents"]}
    names = list(topics)
    batches = [[{"id": f"doc-{b}-{i}", "text": topics[names[(b * 20 + i) % len(names)]]} for i in range(20)]
               for b in range(40)]
    sender = threading.Thread(target=_quietly, args=(lambda: [post(first, "/documents", {"documents": batch},
                                                                   headers={"X-API-Key": KEY})
                                                              for batch in batches],))
    sender.start()
    time.sleep(2.0)  # some batches in, one being chunked, indexed or saved
    first.kill()
    sender.join()
    second = Server(state)  # reloads the state folder, no --docs
    try:
        after = {d["id"] for d in httpx.get(second.url + "/documents").json()["documents"]}
        landed = [len(after & {d["id"] for d in batch}) for batch in batches]
        assert before <= after and set(landed) <= {0, 20}, landed  # whole batches only
        assert landed == sorted(landed, reverse=True)  # the ones sent first
        assert post(second, "/query/hybrid", {"question": QUESTION}).status_code == 200
        assert post(second, "/diffusion/generate", {"condition": QUESTION}).status_code == 409  # no --generator
    finally:
        second.stop()
    assert not [p for p in os.listdir(state) if p.endswith(".tmp")]
    assert (state / "passages" / "index.json").is_file()  # the passage caches are saved at shutdown


def _quietly(function):
    try:
        function()
    except httpx.TransportError:  # the server was killed under it
        pass


def test_serve_refuses_what_cannot_work(folder, tmp_path, capsys):
    from hybridrag.cli import main  # in-process: both refusals come before a server or a model starts

    root, docs, config = folder
    assert main(["serve", "--kb", str(tmp_path / "new")]) == 2
    assert "holds no system yet: give --docs" in capsys.readouterr().err
    assert main(["serve", "--kb", str(tmp_path / "new"), "--port", "70000", "--docs", str(docs)]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert main(["serve", "--kb", str(tmp_path / "new"), "--generator", str(tmp_path / "none.pt")]) == 2
    assert f"--generator {tmp_path / 'none.pt'}: no such file" in capsys.readouterr().err
