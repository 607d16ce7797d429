"""What the two command lines share (`hybridrag`, `python -m hybridrag.retrieval`): usage errors on one line with
status 2, and a positive-int argument type. Kept free of heavy imports so `--help` stays fast."""
import argparse


def one_line_parser(prefix):
    """An ArgumentParser class whose usage errors print one line, `{prefix}error: ...`, and exit with status 2."""

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, f"{prefix}error: {message} (see {self.prog} --help)\n")

    return OneLineParser


def positive_int(text):
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value
