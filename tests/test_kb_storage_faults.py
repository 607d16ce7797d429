"""Knowledge-base storage under faults: a save stopped at each step, real SIGKILLs, leftovers of dead and live saves,
tampered manifests, files that pass their checksum but do not parse."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hybridrag.retrieval import storage
from hybridrag.retrieval.documents import Document
from hybridrag.retrieval.encoder import HashingEncoder
from hybridrag.retrieval.knowledge_base import KnowledgeBase

OLD = [Document("try", "try and except catch an exception", "Errors"),
       Document("with", "a context manager runs enter and exit"),
       Document("loop", "for loops iterate over a sequence")]
NEW = OLD + [Document("yield", "a generator function uses yield to produce values")]


class Crash(BaseException):
    """Stops a save the way a kill does: no `except Exception` clean-up runs, and its process counts as ended."""


def build(documents):
    return KnowledgeBase.build(documents, HashingEncoder(64))


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def crash_at(monkeypatch, step):
    def hook(name):
        if name == step:
            raise Crash(step)
    monkeypatch.setattr(storage, "_crash_point", hook)


def assert_whole(directory, expected):
    """`directory` loads as exactly the knowledge base `expected` (documents, search results of every mode), can be
    saved again, and nothing else is left beside it."""
    loaded = KnowledgeBase.load(directory)
    assert loaded.documents == expected.documents
    for mode in ("dense", "bm25", "hybrid"):
        assert loaded.search("exception context generator", 4, mode) == expected.search(
            "exception context generator", 4, mode)
    assert names(directory.parent) == [directory.name]
    loaded.add([Document("later", "added after recovery")])
    loaded.save(directory)
    assert len(KnowledgeBase.load(directory)) == len(expected) + 1
    assert names(directory.parent) == [directory.name]


# (step the save stops after, which state a load then gives)
STEPS = [("staging-partial", "old"), ("files-written", "old"), ("manifest-written", "old"),
         ("old-moved-aside", "new"), ("new-moved-in", "new"), ("before-old-deleted", "new")]


@pytest.mark.parametrize("step, state", STEPS)
def test_a_save_stopped_at_any_step_loads_as_the_old_or_the_new_knowledge_base(tmp_path, monkeypatch, step, state):
    old, new = build(OLD), build(NEW)
    old.save(tmp_path / "kb")
    crash_at(monkeypatch, step)
    with pytest.raises(Crash):
        new.save(tmp_path / "kb")
    assert len(names(tmp_path)) >= 2  # the stop left something behind
    monkeypatch.setattr(storage, "_crash_point", None)
    assert_whole(tmp_path / "kb", old if state == "old" else new)


def test_a_save_stopped_while_deleting_the_old_folder_loads_as_the_new_one(tmp_path, monkeypatch):
    old, new = build(OLD), build(NEW)
    old.save(tmp_path / "kb")
    real_rmtree = shutil.rmtree

    def half_rmtree(path, *args, **kwargs):
        for victim in sorted(path.rglob("*.npy")):  # some of the folder goes, then the kill
            victim.unlink()
        raise Crash("rmtree")

    monkeypatch.setattr(storage.shutil, "rmtree", half_rmtree)
    with pytest.raises(Crash):
        new.save(tmp_path / "kb")
    assert any(name.startswith(".kb.old-") for name in names(tmp_path))
    monkeypatch.setattr(storage.shutil, "rmtree", real_rmtree)
    assert_whole(tmp_path / "kb", new)


def test_a_load_stopped_while_recovering_is_recovered_by_the_next_load(tmp_path, monkeypatch):
    old, new = build(OLD), build(NEW)
    old.save(tmp_path / "kb")
    crash_at(monkeypatch, "old-moved-aside")
    with pytest.raises(Crash):
        new.save(tmp_path / "kb")
    monkeypatch.setattr(storage, "_crash_point", None)

    def killed(path):
        raise Crash("remove")

    monkeypatch.setattr(storage, "_remove", killed)  # the new folder is in place, the old one not yet deleted
    with pytest.raises(Crash):
        KnowledgeBase.load(tmp_path / "kb")
    monkeypatch.undo()
    assert_whole(tmp_path / "kb", new)


@pytest.mark.parametrize("step, loads", [("staging-partial", False), ("files-written", False),
                                         ("manifest-written", True), ("new-moved-in", True)])
def test_a_first_save_stopped_at_any_step_leaves_nothing_or_the_new_knowledge_base(tmp_path, monkeypatch, step,
                                                                                    loads):
    new = build(NEW)
    crash_at(monkeypatch, step)
    with pytest.raises(Crash):
        new.save(tmp_path / "kb")
    monkeypatch.setattr(storage, "_crash_point", None)
    if loads:
        assert_whole(tmp_path / "kb", new)
    else:
        with pytest.raises(FileNotFoundError, match="no knowledge base at .*kb"):
            KnowledgeBase.load(tmp_path / "kb")
        assert names(tmp_path) == []  # the incomplete staging folder is gone


def test_a_save_that_raises_rolls_back_and_leaves_nothing(tmp_path, monkeypatch):
    old, new = build(OLD), build(NEW)
    old.save(tmp_path / "kb")

    def disk_full(name):
        if name == "old-moved-aside":
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(storage, "_crash_point", disk_full)
    with pytest.raises(OSError, match="No space left"):
        new.save(tmp_path / "kb")
    assert names(tmp_path) == ["kb"]
    monkeypatch.setattr(storage, "_crash_point", None)
    assert_whole(tmp_path / "kb", old)


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_saves_are_removed_and_those_of_running_saves_kept(tmp_path, monkeypatch):
    old = build(OLD)
    old.save(tmp_path / "kb")
    gone = dead_pid()
    for name in (f".kb.saving-{gone}", f".kb.saving-{gone}-0badc0de", f".kb.old-{gone}-00ff00ff"):
        (tmp_path / name / "bm25").mkdir(parents=True)
        (tmp_path / name / "bm25" / "big.npy").write_bytes(b"x" * 1000)
    (tmp_path / f".kb.tmp-{gone}").write_bytes(b"partial")
    live = f".kb.saving-{os.getppid()}-12345678"  # the test runner's parent: alive, not us
    (tmp_path / live).mkdir()
    ours = f".kb.saving-{os.getpid()}-abcdef01"  # a save under way in another thread of this process
    (tmp_path / ours).mkdir()
    monkeypatch.setattr(storage, "_IN_PROGRESS", {ours})
    other = tmp_path / ".kbx.saving-1"  # another name's: not ours to judge
    other.mkdir()
    assert len(KnowledgeBase.load(tmp_path / "kb")) == len(OLD)
    assert names(tmp_path) == sorted([live, ours, ".kbx.saving-1", "kb"])
    shutil.rmtree(tmp_path / "kb")
    with pytest.raises(FileNotFoundError, match=r"belong to a save still running \(retry when it ends\)"):
        KnowledgeBase.load(tmp_path / "kb")
    monkeypatch.setattr(storage, "_IN_PROGRESS", set())  # that thread's save has ended without finishing
    old.save(tmp_path / "kb")
    assert names(tmp_path) == sorted([live, ".kbx.saving-1", "kb"])


def test_repeated_stopped_saves_do_not_pile_up(tmp_path, monkeypatch):
    kb = build(OLD)
    kb.save(tmp_path / "kb")
    for number in range(5):
        kb.add([Document(f"extra{number}", f"extra text {number}")])
        crash_at(monkeypatch, "files-written")
        with pytest.raises(Crash):
            kb.save(tmp_path / "kb")
        assert len(names(tmp_path)) == 2  # the one left by this stop; the earlier ones were removed
    monkeypatch.setattr(storage, "_crash_point", None)
    assert len(KnowledgeBase.load(tmp_path / "kb")) == len(OLD) and names(tmp_path) == ["kb"]


# ---------------------------------------------------------------- real kills

SAVER = textwrap.dedent("""
    import os, random, signal, sys, time
    from hybridrag.retrieval.documents import Document
    from hybridrag.retrieval.encoder import HashingEncoder
    from hybridrag.retrieval.knowledge_base import KnowledgeBase

    target, kills = sys.argv[1], int(sys.argv[2])
    random.seed(int(sys.argv[3]))

    def say(*words):  # one write() a line: a kill mid-line would garble buffered output
        os.write(1, (" ".join(map(str, words)) + "\\n").encode())

    def saver():
        try:
            kb = KnowledgeBase.load(target)  # recovers from the previous kill
        except FileNotFoundError:
            kb = KnowledgeBase.build([Document("base", "the first document")], HashingEncoder(32))
        while True:
            number = len(kb)
            kb.add([Document(f"doc{number}", f"text of document {number}")])
            kb.save(target)
            say("saved", len(kb))

    parent = os.path.dirname(os.path.abspath(target))
    for _ in range(kills):
        say("start")
        child = os.fork()
        if child == 0:
            try:
                saver()
            finally:
                os._exit(1)
        time.sleep(random.uniform(0.15, 0.45))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)  # reaped: a zombie would still answer os.kill(pid, 0)
        say("killed", len(os.listdir(parent)) - 1)
""")


def test_a_knowledge_base_survives_random_sigkills_mid_save(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "kb"
    kills = 12
    done = subprocess.run([sys.executable, str(script), str(target), str(kills), "7"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines.count("killed") == kills and "Traceback" not in done.stderr
    # Each child starts from what the previous one left: the last completed save, or the one it was killed in.
    rounds = done.stdout.split("start")[1:]
    sizes = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("saved")]
    assert sizes, "no save completed before the kills"
    last = [int(line.split()[1]) for line in rounds[-1].splitlines() if line.startswith("saved")]
    loaded = KnowledgeBase.load(target)
    floor = last[-1] if last else None
    if floor is not None:
        assert len(loaded) in (floor, floor + 1)
    assert [d.id for d in loaded.documents] == ["base"] + [f"doc{n}" for n in range(1, len(loaded))]
    assert names(tmp_path / "data") == ["kb"]
    left = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("killed")]
    print(f"{kills} SIGKILLs, {sum(n > 0 for n in left)} left leftovers ({sum(left)} entries), {len(sizes)} saves")


# ---------------------------------------------------------------- tampered manifests


def resign(directory):
    """Rewrite the manifest's files table to match the files: an edit the checksums cannot catch."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "kb"
    build(OLD).save(directory)
    return directory


@pytest.fixture
def kb_copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "kb")
    return tmp_path / "kb"


def edit_manifest(directory, edit):
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


FIELDS = ["documents", "next_key", "encoder.name", "encoder.dimension", "index.kind", "index.requested_kind",
          "files.keys.npy.bytes", "files.keys.npy.sha256", "encoder", "index", "files", "version"]
WRONG = ["3", 2.5, None, True, -1, [], {}]


def parent_of(manifest, field):
    if field.startswith("files.") and field.count(".") > 1:
        name, leaf = field[len("files."):].rsplit(".", 1)
        return manifest["files"][name], leaf
    *path, leaf = field.split(".")
    for part in path:
        manifest = manifest[part]
    return manifest, leaf


def wrong_values(field):
    valid = {"index.kind": [None], "encoder.name": ["3"]}.get(field, [])
    return [value for value in WRONG if not any(value is v for v in valid)]


@pytest.mark.parametrize("field", FIELDS)
def test_a_tampered_manifest_field_is_a_value_error_naming_the_file_and_field(kb_copy, field):
    leaf_name = field.rsplit(".", 1)[0] if field.startswith("files.") else field
    cases = [("delete", None)] + [("set", value) for value in wrong_values(field)]
    for action, value in cases:
        original = (kb_copy / "manifest.json").read_text()

        def edit(manifest):
            parent, leaf = parent_of(manifest, field)
            if action == "delete":
                del parent[leaf]
            else:
                parent[leaf] = value
        edit_manifest(kb_copy, edit)
        with pytest.raises(ValueError, match="manifest.json") as caught:
            KnowledgeBase.load(kb_copy)
        message = str(caught.value)
        assert f"'{field}'" in message or f"'{leaf_name}" in message or field == "version", (action, value, message)
        (kb_copy / "manifest.json").write_text(original)
    assert len(KnowledgeBase.load(kb_copy)) == len(OLD)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.__setitem__("format", "something-else"), r"not a hybridrag knowledge-base manifest \(field 'format'"),
    (lambda m: m.pop("format"), "field 'format' must be"),
    (lambda m: m.__setitem__("version", 2), "has version 2; this hybridrag reads 1"),
    (lambda m: m["files"].__setitem__("../outside", m["files"]["keys.npy"]), "not a path inside the knowledge base"),
    (lambda m: m["files"].__setitem__("keys.npy", 7), r"field 'files.keys.npy' must be a JSON object, got int"),
    (lambda m: m["files"].pop("vectors.npz"), r"field 'files' does not list \['vectors.npz'\]"),
    (lambda m: m["encoder"].__setitem__("name", ""), "field 'encoder.name' must be a non-empty string"),
    (lambda m: m["index"].__setitem__("kind", "hnsw"), r"vector index is \(kind, requested_kind\) \('flat', 'auto'\) "
                                                       r"but the manifest says \('hnsw', 'auto'\)"),
    (lambda m: m.__setitem__("documents", 5), "inconsistent: 3 documents, 3 keys, 3 vectors, manifest 5"),
    (lambda m: m.__setitem__("next_key", 1), r"keys.npy: keys must be distinct and in \[0, next_key=1\)"),
    (lambda m: m["files"]["keys.npy"].__setitem__("sha256", "0" * 64), "keys.npy is corrupted"),
])
def test_tampered_manifests_are_refused_with_a_clear_message(kb_copy, edit, match):
    edit_manifest(kb_copy, edit)
    with pytest.raises(ValueError, match=match):
        KnowledgeBase.load(kb_copy)


def test_a_manifest_that_is_not_an_object_or_not_utf8_is_refused(kb_copy):
    (kb_copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="manifest.json is not a hybridrag knowledge-base manifest"):
        KnowledgeBase.load(kb_copy)
    (kb_copy / "manifest.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(ValueError, match="manifest.json is corrupted"):
        KnowledgeBase.load(kb_copy)


# ---------------------------------------------------------------- files that do not parse


def test_invalid_utf8_in_documents_is_caught_by_the_checksum_or_named(kb_copy):
    path = kb_copy / "documents.jsonl"
    path.write_bytes(path.read_bytes().replace(b"catch", b"c\xffch"))
    with pytest.raises(ValueError, match=r"documents.jsonl is corrupted \(its size or sha256 differs"):
        KnowledgeBase.load(kb_copy)
    resign(kb_copy)
    with pytest.raises(ValueError, match=r"documents.jsonl.* not valid UTF-8"):
        KnowledgeBase.load(kb_copy)


@pytest.mark.parametrize("name, data, match", [
    ("bm25/bm25.json", b'{"k1": 1.5, "ids": "\xff"}', r"bm25 is not valid UTF-8"),
    ("bm25/bm25.json", b'{"k1": 1.5, "b": 0.75, "method": "lucene", "stopwords": "en", "ids": 5}',
     r"bm25 cannot be read \(TypeError"),
    ("bm25/vocab.index.json", b"\xff\xfe not json", r"bm25 (is not valid UTF-8|cannot be read)"),
    ("bm25/data.csc.index.npy", b"garbage", r"bm25 cannot be read"),
    ("keys.npy", b"garbage", r"keys.npy cannot be read"),
    ("vectors.npz", b"garbage", r"vectors.npz is corrupted or not an index"),
])
def test_a_damaged_file_that_passes_its_checksum_is_a_value_error_naming_it(kb_copy, name, data, match):
    (kb_copy / name).write_bytes(data)
    resign(kb_copy)
    with pytest.raises(ValueError, match=match):
        KnowledgeBase.load(kb_copy)


def test_keys_of_the_wrong_type_are_refused(kb_copy):
    np.save(kb_copy / "keys.npy", np.arange(3, dtype=np.float32))
    resign(kb_copy)
    with pytest.raises(ValueError, match=r"keys.npy must hold a 1-D int64 array, got float32 of shape \(3,\)"):
        KnowledgeBase.load(kb_copy)


def test_a_leftover_that_cannot_be_removed_is_a_warning_not_a_failed_load(tmp_path, monkeypatch):
    build(OLD).save(tmp_path / "kb")
    (tmp_path / f".kb.saving-{dead_pid()}").mkdir()

    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(storage, "_remove", read_only)
    with pytest.warns(UserWarning, match=r"could not remove .*\.kb\.saving-\d+, left by an interrupted save"):
        assert len(KnowledgeBase.load(tmp_path / "kb")) == len(OLD)
