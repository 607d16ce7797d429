"""KnowledgeBase under threads: one writer adding and removing beside searchers (and a saver), every returned document
checked against a brute-force recomputation on the snapshot the search could have seen; the lazy BM25 build under
concurrent first searches; the readers-writer lock on its own."""
import re
import threading
import time

import faiss
import numpy as np
import pytest

from hybridrag.retrieval.documents import Document, embedding_text
from hybridrag.retrieval.encoder import HashingEncoder
from hybridrag.retrieval.knowledge_base import KnowledgeBase
from hybridrag.retrieval.locking import ReadWriteLock

STRESS_SECONDS = 3.0
JOIN_SECONDS = 30
WRITER_PAUSE = 0.005  # a writer that never pauses leaves the searchers mostly queued behind it
SAVER_PAUSE = 0.25  # a save (~0.1 s of fsyncs here) holds the read lock: writers, and searches behind them, wait
MODES = ("dense", "bm25", "hybrid")
ENCODER = HashingEncoder(64)
_RNG = np.random.default_rng(0)
WORDS = [f"w{i}" for i in range(80)]
POOL = [Document(f"d{i}", " ".join(_RNG.choice(WORDS, size=_RNG.integers(4, 12))), title=f"t{i % 7}")
        for i in range(240)]
QUERIES = [" ".join(_RNG.choice(WORDS, size=_RNG.integers(1, 4))) for _ in range(40)]
POSITION = {d.id: n for n, d in enumerate(POOL)}
# cosine of every query with every pool document, float64, from the encoder itself (what the index must report)
TRUE = ENCODER.encode(QUERIES).astype(np.float64) @ ENCODER.encode([embedding_text(d) for d in POOL]).T.astype(
    np.float64)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """The parallelism under test is the searcher threads'; FAISS's own OpenMP teams on top of them spin-wait on a
    busy 2-core machine (a 160-vector search took 15 ms with 2 OpenMP threads, 0.06 ms with 1)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def tokens(text):
    return set(re.findall(r"\w\w+", text.lower()))


class Writer:
    """Adds and removes small batches of pool documents; states[j] is the set of ids after j operations."""

    def __init__(self, kb, seed):
        self.kb, self.rng = kb, np.random.default_rng(seed)
        self.states = [frozenset(d.id for d in kb.documents)]
        self.started = self.completed = 0
        self.error = None

    def step(self):
        present = sorted(self.states[-1])
        absent = sorted(POSITION.keys() - self.states[-1])
        count = int(self.rng.integers(1, 5))
        adding = len(present) < 120 or (len(present) < 220 and self.rng.random() < 0.5)
        chosen = self.rng.choice(absent if adding else present, size=count, replace=False).tolist()
        self.started += 1
        if adding:
            self.kb.add([POOL[POSITION[i]] for i in chosen])
            self.states.append(self.states[-1] | set(chosen))
        else:
            assert self.kb.remove(chosen) == count
            self.states.append(self.states[-1] - set(chosen))
        self.completed += 1

    def run(self, stop):
        try:
            while not stop.is_set():
                self.step()
                time.sleep(WRITER_PAUSE)
        except BaseException as error:  # reported by the test, not swallowed
            self.error = error


def searcher(kb, writer, stop, seed, records):
    rng = np.random.default_rng(seed)
    try:
        while not stop.is_set():
            query, k, mode = int(rng.integers(len(QUERIES))), int(rng.integers(1, 9)), MODES[int(rng.integers(3))]
            before = writer.completed
            results = kb.search(QUERIES[query], k, mode)
            after = writer.started
            records.append((mode, query, k, before, after, [(r.document, r.score, r.rank) for r in results]))
    except BaseException as error:
        records.append(("error", error))


def saver(kb, writer, stop, directory, records):
    try:
        while not stop.is_set():
            before = writer.completed
            kb.save(directory)
            after = writer.started
            loaded = KnowledgeBase.load(directory, ENCODER)
            checks = [(query, loaded.search(QUERIES[query], 5, "dense")) for query in (0, 1, 2)]
            records.append((frozenset(d.id for d in loaded.documents), len(loaded.index), len(loaded.bm25), before,
                            after, checks))
            time.sleep(SAVER_PAUSE)
    except BaseException as error:
        records.append(("error", error))


def check_dense(kind, members, query, k, hits):
    """None when `hits` are a correct dense answer on the snapshot `members`, else why not."""
    positions = [POSITION[i] for i in members]
    expected = min(k, len(positions))
    for document, score, _ in hits:
        if document.id not in members:
            return f"{document.id} is not in the snapshot"
        if document is not POOL[POSITION[document.id]] and document != POOL[POSITION[document.id]]:
            return f"{document.id} came back with other content"
        if abs(score - TRUE[query, POSITION[document.id]]) > 1e-5:
            return f"{document.id} scored {score}, its cosine is {TRUE[query, POSITION[document.id]]}"
    if kind == "flat":
        best = np.sort(TRUE[query, positions])[::-1][:expected]
        if len(hits) != expected or not np.allclose([s for _, s, _ in hits], best, atol=1e-5):
            return f"not the exact top {expected}: {[s for _, s, _ in hits]} vs {best.tolist()}"
    elif not hits:
        return "no result"
    return None


def check_bm25(members, query, hits):
    words = tokens(QUERIES[query])
    for document, score, _ in hits:
        if document.id not in members:
            return f"{document.id} is not in the snapshot"
        if not score > 0 or not words & tokens(embedding_text(document)):
            return f"{document.id} scored {score} and shares no token with {QUERIES[query]!r}"
    return None


def check_hybrid(members, k, hits):
    for document, score, _ in hits:
        if document.id not in members:
            return f"{document.id} is not in the snapshot"
        if not score > 0:
            return f"{document.id} has fused score {score}"
    if len(hits) != min(k, len(members)):
        return f"{len(hits)} results for k={k} over {len(members)} documents"
    return None


def check(kind, states, record):
    mode, query, k, before, after, hits = record
    ids = [d.id for d, _, _ in hits]
    if len(set(ids)) != len(ids) or [r for _, _, r in hits] != list(range(1, len(hits) + 1)):
        return f"repeated ids or bad ranks: {ids}"
    if any(a[1] < b[1] for a, b in zip(hits, hits[1:])):
        return "scores not best first"
    reasons = []
    for members in states[before:after + 1]:  # the snapshots the search may have seen
        if mode == "dense":
            reason = check_dense(kind, members, query, k, hits)
        elif mode == "bm25":
            reason = check_bm25(members, query, hits)
        else:
            reason = check_hybrid(members, k, hits)
        if reason is None:
            return None
        reasons.append(reason)
    return f"{mode} {QUERIES[query]!r} k={k}: {reasons[0]}"


def check_save(states, record):
    ids, vectors, bm25, before, after, checks = record
    if not (len(ids) == vectors == bm25) or ids not in states[before:after + 1]:
        return f"saved {len(ids)} documents, {vectors} vectors, {bm25} BM25 entries: not one state"
    for query, results in checks:
        reason = check_dense("flat", ids, query, 5, [(r.document, r.score, r.rank) for r in results])
        if reason:
            return f"the loaded copy: {reason}"
    return None


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_searches_beside_a_writer_and_a_saver_see_one_consistent_snapshot(tmp_path, kind):
    kb = KnowledgeBase.build(POOL[:160], ENCODER, index_kind=kind, device="cpu")
    writer, stop = Writer(kb, seed=1), threading.Event()
    records = [[] for _ in range(3)]
    saves = []
    threads = [threading.Thread(target=writer.run, args=(stop,), daemon=True),
               threading.Thread(target=saver, args=(kb, writer, stop, tmp_path / "kb", saves), daemon=True)]
    threads += [threading.Thread(target=searcher, args=(kb, writer, stop, 10 + n, records[n]), daemon=True)
                for n in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(STRESS_SECONDS)
    stop.set()
    deadline = time.monotonic() + JOIN_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in threads if t.is_alive()], "a thread is still running: a deadlock or a hang"
    assert writer.error is None, f"the writer failed: {writer.error!r}"
    errors = [r[1] for rows in records + [saves] for r in rows if r[0] == "error"]
    assert not errors, f"{len(errors)} calls raised, first: {errors[0]!r}"
    searches = [r for rows in records for r in rows]
    wrong = [reason for reason in (check(kind, writer.states, r) for r in searches) if reason]
    assert not wrong, f"{len(wrong)} of {len(searches)} searches were wrong, first: {wrong[0]}"
    bad_saves = [reason for reason in (check_save(writer.states, r) for r in saves) if reason]
    assert not bad_saves, f"{len(bad_saves)} of {len(saves)} saves were wrong, first: {bad_saves[0]}"
    counts = {mode: sum(r[0] == mode for r in searches) for mode in MODES}
    print(f"\n{kind}: {len(searches)} searches checked {counts}, {len(saves)} saves, {writer.completed} writes, "
          f"{STRESS_SECONDS} s, 1 writer + 1 saver + 3 searchers")
    assert min(counts.values()) >= 20 and writer.completed >= 20 and saves, "too little ran to prove anything"


def test_first_bm25_searches_after_build_do_not_race():
    errors, calls = [], []
    for round_ in range(10):
        kb = KnowledgeBase.build(POOL[:100], ENCODER)  # the BM25 index is built on the first search
        barrier = threading.Barrier(4)

        def search(seed):
            try:
                barrier.wait(5)
                for query in range(seed, seed + 3):
                    hits = kb.search(QUERIES[query], 5, "bm25")
                    calls.append(check_bm25(frozenset(d.id for d in POOL[:100]), query, [(h.document, h.score, h.rank)
                                                                                       for h in hits]))
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=search, args=(3 * n,), daemon=True) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN_SECONDS)
        assert not [t for t in threads if t.is_alive()], f"round {round_}: a thread hangs"
    assert not errors, f"{len(errors)} of 120 searches raised, first: {errors[0]!r}"
    assert len(calls) == 120 and not [c for c in calls if c], [c for c in calls if c][:3]


# ---------------------------------------------------------------- the lock alone


def run(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def test_readers_share_the_lock():
    lock, barrier = ReadWriteLock(), threading.Barrier(3)
    done = []

    def reader():
        with lock.read():
            barrier.wait(5)  # all three inside at once, or this times out
            done.append(1)

    threads = [run(reader) for _ in range(3)]
    for thread in threads:
        thread.join(10)
    assert done == [1, 1, 1]


def test_a_writer_excludes_readers_and_other_writers():
    lock, inside = ReadWriteLock(), threading.Event()
    lock.acquire_write()
    reader = run(lambda: (lock.acquire_read(), inside.set(), lock.release_read()))
    writer = run(lambda: (lock.acquire_write(), lock.release_write()))
    assert not inside.wait(0.2) and writer.is_alive()
    lock.release_write()
    reader.join(5)
    writer.join(5)
    assert inside.is_set() and not reader.is_alive() and not writer.is_alive()


def test_a_waiting_writer_goes_before_new_readers():
    lock, order = ReadWriteLock(), []
    lock.acquire_read()
    writer = run(lambda: (lock.acquire_write(), order.append("writer"), lock.release_write()))
    while not lock._waiting_writers:
        time.sleep(0.001)
    late_reader = run(lambda: (lock.acquire_read(), order.append("reader"), lock.release_read()))
    time.sleep(0.1)
    assert order == []  # the late reader waits behind the writer, not beside the first reader
    with lock.read():  # reentrant: the thread holding a read lock is not held back by the writer waiting on it
        pass
    lock.release_read()
    writer.join(5)
    late_reader.join(5)
    assert order == ["writer", "reader"]


def test_reentry_and_misuse():
    lock = ReadWriteLock()
    with lock.write():
        with lock.write():
            with lock.read():
                pass
    with lock.read():
        with pytest.raises(RuntimeError, match="holds the read lock: release it before taking the write lock"):
            lock.acquire_write()
    with pytest.raises(RuntimeError, match="release_read called by a thread that holds no read lock"):
        lock.release_read()
    with pytest.raises(RuntimeError, match="release_write called by a thread that does not hold the write lock"):
        lock.release_write()
    with lock.write():  # still usable: the failed calls changed nothing
        assert repr(lock) == "ReadWriteLock(readers=0, writer=held, waiting_writers=0)"
