"""Optional dependencies: import one, or say what to install."""
import importlib


def import_optional(module, package, extra=None):
    """`importlib.import_module(module)`, or an ImportError naming the pip package and the hybridrag extra that
    installs it. Only an absent top-level package is translated: a missing submodule of an installed package (too old
    a version) or an error inside one propagates as it is."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module.partition(".")[0]:
            raise
        install = f"pip install 'hybridrag[{extra}]'" if extra else f"pip install '{package}'"
        raise ImportError(f"{package} is not installed (no module named {module!r}); install it with {install}",
                          name=module) from error
