"""A HybridEncoder as a knowledge-base encoder, and its retrieval quality on the pydoc question set.

    from hybridrag.encoders.retrieval import HybridTextEncoder
    encoder = HybridTextEncoder("encoder.pt")               # or HybridTextEncoder(a_hybrid_encoder, name="...")
    knowledge_base = KnowledgeBase.build(documents, encoder, chunk_tokens=200)
    # the same through hybridrag.retrieval.encoder.make_encoder("hybrid-encoder:encoder.pt")

HybridTextEncoder has DenseEncoder's interface (`.name`, `.dimension`, `.encode(texts, *, batch_size=None,
show_progress=None)` -> float32 (N, dimension) with L2-normalised rows, `.tokenizer`, `.max_length`), so a knowledge
base chunks with its tokenizer and searches with inner products. Loaded from a checkpoint, its name is
"hybrid-encoder:<absolute path>#<first 12 hex digits of the checkpoint's SHA-256>": a knowledge base built with it
rebuilds it from its manifest, and refuses a checkpoint retrained in the same place. Wrapping an encoder object, its
name is "HybridEncoder-<12 hex digits>" of a digest of its config and weights taken then (train first, then wrap):
a knowledge base built with those weights refuses an encoder with others. It is the one wrapper: the cascade
(hybridrag.distillation.retrieval_cascade) and the pipeline's vector store wrap a HybridEncoder in it through
hybridrag.retrieval.encoder.as_retrieval_encoder.

`pydoc_retrieval_quality` scores encoders on the pydoc topics the way benchmarks/retrieval_quality.py does (the
topics of `pydoc_data.topics` chunked into 200-token windows with 40 overlap by the encoder's tokenizer, dense search
of the 100 best chunks, folded into a ranking of topics by each topic's best chunk, recall@k, MRR and nDCG@10 from
hybridrag.retrieval.metrics); `python -m hybridrag.encoders evaluate` prints it.
"""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..checked_file import header_digest
from ..retrieval.encoder import HYBRID_ENCODER_PREFIX as SPEC_PREFIX, check_texts
from .model import HybridEncoder

DEFAULT_QUERIES = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "pydoc_queries.jsonl"
KS = (1, 5, 10)
DEPTH = 100
_NAME = re.compile(r"hybrid-encoder:(.+)#([0-9a-f]{12})")


def checkpoint_digest(path):
    """The SHA-256 its header records for the HybridEncoder checkpoint at `path` (read from the header alone)."""
    return header_digest(path, "HybridEncoder")


def weights_digest(module):
    """sha256 hex of a HybridEncoder's config and every state tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(module.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{name}={tensor!r}".encode())
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class HybridTextEncoder:
    """A HybridEncoder with the knowledge-base encoder interface (see the module docstring).

    Args:
        encoder: a HybridEncoder, or the path of a checkpoint HybridEncoder.save wrote (loaded here, quantized as
            saved).
        name: the name a knowledge base's manifest stores (a knowledge base is loaded again only with an encoder of
            the same name): default "hybrid-encoder:<path>#<sha>" for a checkpoint, "HybridEncoder-<12 hex>" (a
            digest of the config and weights, taken now) for an encoder object.
        batch_size: texts per forward pass (encode's default).
        show_progress: True/False, or None for a bar on inputs of 1000 texts or more.
        backend: the attention and int8 ops' backend when loading a checkpoint.
    """

    def __init__(self, encoder, *, name=None, batch_size=32, show_progress=None, backend="auto"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if show_progress not in (None, True, False):
            raise TypeError(f"show_progress must be True, False or None, got {show_progress!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be None or a non-empty str, got {name!r}")
        if isinstance(encoder, HybridEncoder):
            self.encoder = encoder
            default = f"{type(encoder).__name__}-{weights_digest(encoder)[:12]}"
        elif isinstance(encoder, (str, Path)):
            path = Path(encoder).resolve()
            self.encoder = HybridEncoder.load(path, backend=backend)
            default = f"{SPEC_PREFIX}{path}#{checkpoint_digest(path)[:12]}"
        else:
            raise TypeError(f"encoder must be a HybridEncoder or a checkpoint path, got {type(encoder).__name__}")
        self.encoder.eval()
        self.name = name or default
        self.dimension = self.encoder.dimension
        self.batch_size, self.show_progress = batch_size, show_progress

    @classmethod
    def from_spec(cls, spec):
        """The encoder a spec names: "hybrid-encoder:<checkpoint path>", optionally followed by "#<12 hex digits>"
        (a knowledge base's manifest name), in which case the checkpoint's digest must start with them."""
        if not isinstance(spec, str) or not spec.startswith(SPEC_PREFIX) or len(spec) == len(SPEC_PREFIX):
            raise ValueError(f"a hybrid encoder spec is 'hybrid-encoder:<checkpoint path>', got {spec!r}")
        named = _NAME.fullmatch(spec)
        path = named.group(1) if named else spec[len(SPEC_PREFIX):]
        encoder = cls(path)
        if named and not encoder.name.endswith("#" + named.group(2)):
            raise ValueError(f"{spec!r} names checkpoint {path} with digest {named.group(2)}..., but the file there "
                             f"is now {encoder.name.rsplit('#', 1)[1]}... (retrained or replaced): its vectors would "
                             f"not match")
        return encoder

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def max_length(self):
        return self.encoder.config.max_length

    def encode(self, texts, *, batch_size=None, show_progress=None):
        """float32 (N, dimension), rows L2-normalised; (0, dimension) for no text. Texts over max_length tokens keep
        their first tokens (HybridEncoder.encode warns). Non-finite vectors (diverged weights) are a ValueError:
        they would corrupt an index."""
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        progress = show_progress if show_progress is not None else self.show_progress
        vectors = self.encoder.encode(texts, batch_size=batch_size or self.batch_size, progress=progress)
        if not np.isfinite(vectors).all():
            raise ValueError(f"encoder {self.name!r} returned non-finite vectors for {len(texts)} texts (diverged "
                             "weights?): they would corrupt a search index")
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self):
        quantized = "" if self.encoder.quantization is None else f", int8 {self.encoder.quantization.mode}"
        return f"HybridTextEncoder(name={self.name!r}, dimension={self.dimension}{quantized})"


# ---------------------------------------------------------------- pydoc retrieval quality

def load_queries(path=None):
    """The pydoc questions: a list of {"id", "query", "relevant", "split"} from the JSONL file `path` (default the
    source checkout's benchmarks/data/pydoc_queries.jsonl)."""
    path = Path(path) if path is not None else DEFAULT_QUERIES
    if not path.is_file():
        raise FileNotFoundError(f"no query file at {path} (the pydoc query set ships with the source checkout, in "
                                f"benchmarks/data/)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not {"id", "query", "relevant"} <= row.keys():
            raise ValueError(f"{path} line {number}: a query needs 'id', 'query' and 'relevant'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no query")
    return rows


def pydoc_retrieval_quality(encoders, queries, *, splits=("all", "test")):
    """Rows {"method", "split", "queries", "chunks", "recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"} for each
    encoder of the dict `encoders` (method name -> encoder) and split ("all", or a query split such as "test")."""
    import pydoc_data.topics

    from ..retrieval import Document, KnowledgeBase, evaluate

    documents = [Document(key, text, title=key) for key, text in sorted(pydoc_data.topics.topics.items())]
    rows = []
    for method, encoder in encoders.items():
        knowledge_base = KnowledgeBase.build(documents, encoder, chunk_tokens=200, overlap=40, index_kind="flat")
        for split in splits:
            chosen = [q for q in queries if split == "all" or q.get("split") == split]
            if not chosen:
                raise ValueError(f"no query of split {split!r}")
            results = knowledge_base.search_many([q["query"] for q in chosen], DEPTH, "dense", candidates=DEPTH)
            run = {q["id"]: list(dict.fromkeys(knowledge_base.get(r.document.id).metadata["source_id"]
                                               for r in hits)) for q, hits in zip(chosen, results)}
            metrics = evaluate(run, {q["id"]: set(q["relevant"]) for q in chosen}, ks=KS)
            rows.append({"method": method, "split": split, "queries": len(chosen), "chunks": len(knowledge_base),
                         **{f"recall@{k}": metrics[f"recall@{k}"] for k in KS}, "mrr": metrics["mrr"],
                         "ndcg@10": metrics["ndcg@10"]})
    return rows
