"""hybridrag.system.loading.load_documents over real files in tmp_path."""
import json
import os
import warnings

import pytest

from hybridrag.retrieval.documents import Document
from hybridrag.system.loading import load_documents


def write_tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("plain text file\n", encoding="utf-8")
    (root / "guide.md").write_text("intro line\n```\n# not a heading\n```\n## Getting Started ##\nbody\n",
                                   encoding="utf-8")
    (root / "sub" / "notes.md").write_text("no heading here\n", encoding="utf-8")
    (root / "sub" / "deeper" / "b.txt").write_text("\ufeffdeep file", encoding="utf-8")
    (root / "sub" / "records.jsonl").write_text(
        json.dumps({"id": "r1", "text": "first record", "title": "R1", "metadata": {"k": 1}}) + "\n\n"
        + json.dumps({"id": "r2", "text": "second record"}) + "\n", encoding="utf-8")
    return root


def by_id(documents):
    return {document.id: document for document in documents}


def test_folder_of_txt_md_and_jsonl(tmp_path):
    documents = by_id(load_documents(write_tree(tmp_path)))
    assert sorted(documents) == ["a.txt", "guide.md", "r1", "r2", "sub/deeper/b.txt", "sub/notes.md"]
    assert documents["a.txt"] == Document("a.txt", "plain text file\n", "a", {"source": str(tmp_path / "a.txt")})
    assert documents["guide.md"].title == "Getting Started"       # a '#' line in a code fence is no heading
    assert documents["sub/notes.md"].title == "notes"
    assert documents["sub/deeper/b.txt"].text == "deep file"      # the UTF-8 byte order mark is dropped
    assert documents["r1"] == Document("r1", "first record", "R1", {"k": 1})
    assert documents["r2"].title == ""


def test_order_is_sorted_and_stable(tmp_path):
    write_tree(tmp_path)
    ids = [document.id for document in load_documents(tmp_path)]
    assert ids == [document.id for document in load_documents(str(tmp_path))]
    assert ids == ["a.txt", "guide.md", "sub/notes.md", "r1", "r2", "sub/deeper/b.txt"]


def test_not_recursive(tmp_path):
    write_tree(tmp_path)
    assert sorted(d.id for d in load_documents(tmp_path, recursive=False)) == ["a.txt", "guide.md"]


def test_named_files_and_a_list(tmp_path):
    write_tree(tmp_path)
    documents = load_documents([tmp_path / "sub" / "notes.md", str(tmp_path / "sub" / "records.jsonl")])
    assert [d.id for d in documents] == ["notes.md", "r1", "r2"]
    assert documents[0].metadata == {"source": str(tmp_path / "sub" / "notes.md")}


def test_a_file_given_twice_is_read_once(tmp_path):
    write_tree(tmp_path)
    documents = load_documents([tmp_path / "sub", tmp_path / "sub" / "records.jsonl"])
    assert sorted(d.id for d in documents) == ["deeper/b.txt", "notes.md", "r1", "r2"]


def test_other_extensions_and_hidden_files_are_skipped_and_counted(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0")
    (tmp_path / "sub" / "x.png").write_bytes(b"\x89PNG\0")
    (tmp_path / "script.py").write_text("print()", encoding="utf-8")
    (tmp_path / "README").write_text("no extension", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("ref", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"skipped 4 file\(s\) of unsupported types \(1 \(no extension\), "
                                         r"2 \.png, 1 \.py\)"):
        documents = load_documents(tmp_path)
    assert len(documents) == 6


def test_empty_files_are_skipped_with_a_warning(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "blank.md").write_text("  \n\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"skipped 1 empty file\(s\): .*blank.md"):
        assert len(load_documents(tmp_path)) == 6


def test_named_file_of_another_extension_is_refused(tmp_path):
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.csv: unsupported file type '.csv'; load_documents reads .txt, .md, "
                                         r".jsonl"):
        load_documents(tmp_path / "data.csv")


def test_missing_paths_are_named(tmp_path):
    write_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*nope.txt, .*gone"):
        load_documents([tmp_path / "nope.txt", tmp_path / "a.txt", tmp_path / "gone"])


def test_bad_files_raise_naming_every_one(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "binary.txt").write_bytes(b"abc\0def")
    (tmp_path / "latin.md").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (tmp_path / "broken.jsonl").write_text('{"id": "x", "text": \n', encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_documents(tmp_path)
    message = str(caught.value)
    assert "3 file(s) could not be loaded (pass on_error='warn' to load the rest)" in message
    assert f"{tmp_path / 'binary.txt'}: binary file (a NUL byte at offset 3)" in message
    assert f"{tmp_path / 'latin.md'}: not valid UTF-8 (invalid continuation byte at byte 3)" in message
    assert f"{tmp_path / 'broken.jsonl'}: {tmp_path / 'broken.jsonl'}:1: not valid JSON" in message


def test_bad_files_warn_and_the_rest_load(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "binary.jsonl").write_bytes(b'{"id": "z", "text": "\0"}\n')
    (tmp_path / "latin.txt").write_bytes(b"na\xefve")
    with pytest.warns(UserWarning, match=r"2 file\(s\) could not be loaded and were left out:\n  .*binary.jsonl: "
                                         r"binary file.*\n  .*latin.txt: not valid UTF-8"):
        documents = load_documents(tmp_path, on_error="warn")
    assert len(documents) == 6


def test_only_bad_files_is_no_documents(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"na\xefve")
    with pytest.warns(UserWarning, match="could not be loaded"):
        with pytest.raises(ValueError, match="no documents found in"):
            load_documents(tmp_path, on_error="warn")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads a chmod 000 file regardless of its mode, so it cannot be made unreadable")
def test_unreadable_file(tmp_path):
    write_tree(tmp_path)
    locked = tmp_path / "locked.txt"
    locked.write_text("secret", encoding="utf-8")
    locked.chmod(0)
    try:
        with pytest.raises(ValueError, match=r"locked.txt: Permission denied"):
            load_documents(tmp_path)
        with pytest.warns(UserWarning, match=r"locked.txt: Permission denied"):
            assert len(load_documents(tmp_path, on_error="warn")) == 6
    finally:
        locked.chmod(0o600)


@pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_a_file_that_fails_to_read_even_for_root(tmp_path):
    """Reading /proc/self/mem from offset 0 fails with EIO for any user: an OSError reported like the rest."""
    write_tree(tmp_path)
    (tmp_path / "mem.txt").symlink_to("/proc/self/mem")
    with pytest.raises(ValueError, match=r"mem.txt: Input/output error"):
        load_documents(tmp_path)
    with pytest.warns(UserWarning, match=r"mem.txt: Input/output error"):
        assert len(load_documents(tmp_path, on_error="warn")) == 6


def test_duplicate_ids_are_named(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "same.txt").write_text("first", encoding="utf-8")
    (tmp_path / "two" / "same.txt").write_text("second", encoding="utf-8")
    (tmp_path / "one" / "r.jsonl").write_text(json.dumps({"id": "same.txt", "text": "third"}) + "\n",
                                              encoding="utf-8")
    with pytest.raises(ValueError, match=r"document ids appear more than once: \['same.txt'\]"):
        load_documents([tmp_path / "one", tmp_path / "two"])


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=f"no documents found in {tmp_path}"):
        load_documents(tmp_path)


def test_arguments_are_checked(tmp_path):
    write_tree(tmp_path)
    with pytest.raises(TypeError, match="paths must be a str, a Path or a list of them, got int"):
        load_documents(3)
    with pytest.raises(TypeError, match=r"paths\[1\] must be a str or a Path, got NoneType"):
        load_documents([tmp_path, None])
    with pytest.raises(ValueError, match="paths must name at least one file or folder"):
        load_documents([])
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'warn', got 'ignore'"):
        load_documents(tmp_path, on_error="ignore")
    with pytest.raises(TypeError, match="recursive must be True or False, got 1"):
        load_documents(tmp_path, recursive=1)
    with pytest.raises(TypeError, match="progress must be True, False or None, got 'yes'"):
        load_documents(tmp_path, progress="yes")


def test_progress_bar(tmp_path, capsys):
    write_tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # a clean tree loads without any warning
        documents = load_documents(tmp_path, progress=True)
    assert len(documents) == 6
    assert "loading documents" in capsys.readouterr().err
    load_documents(tmp_path, progress=False)
    assert "loading documents" not in capsys.readouterr().err
    load_documents(tmp_path)                           # None: off, stderr is not a terminal under pytest
    assert "loading documents" not in capsys.readouterr().err


def test_package_exports_load_documents():
    import hybridrag.system as system

    assert system.load_documents is load_documents
