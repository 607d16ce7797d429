"""Running from a source checkout: its top-level `kernels/` folder (installed as `hybridrag.kernels`) shadows the
PyPI package `kernels` whenever the checkout's root is on sys.path (`python -m pytest` or `python -m benchmarks...`
run from there). transformers (>= 5.25 depends on that package) then imports our folder for its hub kernels and
fails with "cannot import name 'CUDAProperties' from 'kernels'". Importing the real package first, with the root
left out of the search, puts it in sys.modules, where every later `import kernels` finds it."""
import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shadowed():
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == ROOT / "kernels"


def import_hub_kernels_first():
    """Import PyPI's `kernels` (when installed) ahead of the checkout's folder of that name; no-op elsewhere."""
    if "kernels" in sys.modules or not _shadowed():
        return
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers' availability check reads its metadata and finds none
        pass
    finally:
        sys.path[:] = saved
