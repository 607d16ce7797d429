"""`python -m hybridrag.kernels.build`: build the C++ CPU kernels of csrc/ ahead of time (hybridrag.kernels.cpp)."""
import sys

from . import cpp


def main(argv=None):
    """Build the C++ CPU kernels now (install.sh runs this); exit status 1, with the compiler's output, when they
    do not build."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hybridrag.kernels.build", description=main.__doc__.split(";")[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    try:
        cpp.build(verbose=args.verbose)
    except Exception as error:  # noqa: BLE001
        print(f"hybridrag: the C++ CPU kernels did not build: {error}", file=sys.stderr)
        return 1
    print(f"hybridrag: the C++ CPU kernels are built ({', '.join(cpp.SOURCES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
