"""The retrieval command line's errors: one line on stderr and status 2 for bad arguments and for targets that
cannot be written or read; a traceback for anything else."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from hybridrag.retrieval import cli
from hybridrag.retrieval.documents import Document, save_jsonl
from hybridrag.retrieval.knowledge_base import KnowledgeBase

CORPUS = [Document("try", "try and except catch an exception"), Document("with", "a context manager runs enter"),
          Document("loop", "for loops iterate over a sequence")]


@pytest.fixture
def docs(tmp_path):
    save_jsonl(CORPUS, tmp_path / "docs.jsonl")
    return tmp_path / "docs.jsonl"


def build(docs, target):
    return cli.main(["build", str(docs), str(target), "--encoder", "hashing-64"])


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_a_build_target_that_is_a_file(tmp_path, docs, capsys):
    (tmp_path / "taken").write_text("a file")
    assert build(docs, tmp_path / "taken") == 2
    one_error_line(capsys, f"{tmp_path / 'taken'} is a file, not a knowledge-base folder; choose another path")
    assert (tmp_path / "taken").read_text() == "a file"


def test_a_build_target_under_a_file(tmp_path, docs, capsys):
    (tmp_path / "somefile").write_text("a file")
    assert build(docs, tmp_path / "somefile" / "kb") == 2
    one_error_line(capsys, f"build {tmp_path / 'somefile' / 'kb'}: File exists: {tmp_path / 'somefile'};",
                   "a file is in the way: remove it or choose another path")
    assert build(docs, tmp_path / "somefile" / "sub" / "kb") == 2
    one_error_line(capsys, f"build {tmp_path / 'somefile' / 'sub' / 'kb'}: Not a directory",
                   "a part of the path is a file, not a folder")


def make_immutable(folder):
    """chattr +i (root: even root cannot write there) or chmod 555 (others); None when neither holds."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                            capture_output=True).returncode != 0:
            return None
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        (folder / "probe").touch()
    except OSError:
        return undo
    subprocess.run(undo, check=True)
    (folder / "probe").unlink()
    return None


def test_a_build_target_in_an_immutable_folder(tmp_path, docs, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    undo = make_immutable(folder)
    if undo is None:
        pytest.skip("cannot make a folder unwritable here (no chattr +i as root, or chmod ignored)")
    try:
        assert build(docs, folder / "kb") == 2
    finally:
        subprocess.run(undo, check=True)
    err = one_error_line(capsys, f"build {folder / 'kb'}: ")
    assert "not permitted" in err or "no permission" in err
    assert os.listdir(folder) == []


def test_a_build_target_on_a_read_only_filesystem(tmp_path, docs):
    """A real read-only bind mount in a private mount namespace (root with unshare), else skipped."""
    folder = tmp_path / "ro"
    folder.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {folder} {folder}"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here (needs unshare -m and mount)")
    command = (f"mount --bind -o ro {folder} {folder} && exec {sys.executable} -m hybridrag.retrieval build "
               f"{docs} {folder / 'kb'} --encoder hashing-64")
    done = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"build {folder / 'kb'}: Read-only file system" in done.stderr
    assert "the filesystem is read-only: choose a location on a writable one" in done.stderr


def test_a_full_disk_mid_build_keeps_the_previous_knowledge_base(tmp_path, docs, capsys, monkeypatch):
    assert build(docs, tmp_path / "kb") == 0
    capsys.readouterr()

    def disk_full(path, array, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(np, "save", disk_full)
    save_jsonl(CORPUS + [Document("new", "new text")], docs)
    assert build(docs, tmp_path / "kb") == 2
    one_error_line(capsys, "No space left on device", "the disk is full: free some space or choose another disk")
    monkeypatch.undo()
    assert len(KnowledgeBase.load(tmp_path / "kb")) == len(CORPUS)
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "kb"]


def test_a_damaged_knowledge_base_is_one_line(tmp_path, docs, capsys):
    assert build(docs, tmp_path / "kb") == 0
    (tmp_path / "kb" / "manifest.json").write_text(json.dumps({"format": "hybridrag-knowledge-base", "version": 1}))
    assert cli.main(["stats", str(tmp_path / "kb")]) == 2
    one_error_line(capsys, "manifest.json: field 'documents' is missing")
    assert cli.main(["search", str(tmp_path / "nothing"), "x"]) == 2
    one_error_line(capsys, "no knowledge base at")
    assert build(tmp_path / "no-docs.jsonl", tmp_path / "kb2") == 2
    one_error_line(capsys, "no such JSONL file")


@pytest.mark.parametrize("k", ["0", "-3", "abc", "2.5"])
def test_k_must_be_a_positive_int(tmp_path, capsys, k):
    assert cli.main(["search", str(tmp_path), "query", "-k", k]) == 2
    one_error_line(capsys, f"argument -k: must be a positive int, got '{k}'")


def test_usage_errors_are_one_line_and_help_is_status_0(capsys):
    assert cli.main(["search"]) == 2
    one_error_line(capsys, "the following arguments are required")
    assert cli.main(["--help"]) == 0


def test_a_huge_k_returns_every_document_quickly(tmp_path, docs, capsys):
    assert build(docs, tmp_path / "kb") == 0
    capsys.readouterr()
    start = time.perf_counter()
    assert cli.main(["search", str(tmp_path / "kb"), "exception", "-k", "1000000000", "--mode", "dense",
                     "--json"]) == 0
    assert time.perf_counter() - start < 5
    found = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    assert sorted(found) == sorted(d.id for d in CORPUS)


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(KnowledgeBase, "load", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["stats", str(tmp_path)])


def test_a_key_error_is_printed_without_quotes(tmp_path, monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise KeyError("no document with id 'x'")

    monkeypatch.setattr(KnowledgeBase, "load", missing)
    assert cli.main(["stats", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: no document with id 'x'\n"
