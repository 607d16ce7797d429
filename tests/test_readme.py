"""Every ```python and ```bash block of README.md runs here, so the README cannot drift from the code.

The conventions, read from HTML comments that GitHub does not show:

- Each `## ` section is one script: its blocks run in order in a fresh Python namespace (a later block may use an
  earlier block's names), with a fresh temporary folder as the working directory. Bash blocks run there too, with
  `bash -euo pipefail`, the test's Python first on PATH and hybridrag as installed (`install.sh` installs this
  working tree in editable mode).
- `<!-- readme-test: setup` + Python lines + `-->` just before a block runs first, in the same namespace: the inputs
  the snippet assumes (`x`, a model directory `name`, a `docs.jsonl`), at sizes a CPU runs in a moment.
- `<!-- readme-test: skip <reason> -->` just before a block leaves it out (the install commands); the reason is
  required. `<!-- readme-test: cuda -->` runs the block only where CUDA is available.

Tracebacks point into README.md at the failing line.
"""
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
RUN = ("python", "bash")
DIRECTIVE = re.compile(r"<!-- readme-test: (setup|skip|cuda)\b(.*)")


@dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the first code line
    setup: list = field(default_factory=list)  # (code, first line) of hidden set-up blocks
    skip: str | None = None
    cuda: bool = False


def parse(text, source="README.md"):
    """{section heading: [Block]} for the python and bash blocks of a Markdown text, with their directives."""
    sections, heading, pending, fence, indent = {}, None, [], None, 0
    lines = iter(enumerate(text.splitlines(), start=1))
    for number, line in lines:
        if fence is not None:  # inside a code block (indented ones, in a list item, lose their indentation)
            if line.strip().startswith("```"):
                if fence.language in RUN:
                    sections.setdefault(heading, []).append(fence)
                fence = None
            else:
                fence.code += line[indent:] + "\n"
        elif line.lstrip().startswith("```"):
            indent = len(line) - len(line.lstrip())
            fence = Block(line.strip()[3:].strip(), "", number + 1)
            if pending and fence.language not in RUN:
                raise ValueError(f"{source}:{pending[0][0]}: a readme-test directive before a "
                                 f"{fence.language or 'plain'} block, which is never run")
            for _, kind, argument in pending:
                if kind == "setup":
                    fence.setup.append(argument)
                elif kind == "skip":
                    fence.skip = argument
                else:
                    fence.cuda = True
            pending = []
        elif (match := DIRECTIVE.match(line)) is not None:
            pending.append((number, match.group(1), _directive_argument(match, number, lines, source)))
        elif line.strip() and pending:
            raise ValueError(f"{source}:{pending[0][0]}: a readme-test directive must come just before its code "
                             f"block (only blank lines between), but line {number} is text")
        elif line.startswith("## "):
            heading = line[3:].strip()
    if fence is not None:
        raise ValueError(f"{source}:{fence.line - 1}: a code block that is never closed")
    if pending:
        raise ValueError(f"{source}:{pending[0][0]}: a readme-test directive that no code block follows")
    return sections


def _directive_argument(match, number, lines, source):
    """setup: (code, its first line), read up to the closing '-->'; skip: the reason; cuda: None."""
    kind, rest = match.group(1), match.group(2).strip()
    if kind == "setup":
        if rest:
            raise ValueError(f"{source}:{number}: put the set-up code on the lines after '<!-- readme-test: setup', "
                             "then close it with '-->' on a line of its own")
        code = ""
        for _, line in lines:
            if line.strip() == "-->":
                return code, number + 1
            code += line + "\n"
        raise ValueError(f"{source}:{number}: readme-test: setup is never closed with '-->'")
    if not rest.endswith("-->"):
        raise ValueError(f"{source}:{number}: end 'readme-test: {kind}' with '-->' on the same line")
    reason = rest[:-3].strip()
    if kind == "skip" and not reason:
        raise ValueError(f"{source}:{number}: readme-test: skip needs a reason")
    return reason or None


SECTIONS = parse(README.read_text(encoding="utf-8"))


def run_python(code, line, namespace):
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)


def run_bash(code, line):
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, (f"README.md:{line}: the bash block failed with status {done.returncode}\n"
                                  f"{code}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")


@pytest.mark.parametrize("heading", [h for h, blocks in SECTIONS.items() if any(not b.skip for b in blocks)])
def test_section_runs(heading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for block in SECTIONS[heading]:
        if block.skip or (block.cuda and not torch.cuda.is_available()):
            continue
        for code, line in block.setup:
            run_python(code, line, namespace)
        if block.language == "python":
            run_python(block.code, block.line, namespace)
        else:
            run_bash(block.code, block.line)


def test_the_readme_is_covered():
    blocks = [block for blocks in SECTIONS.values() for block in blocks]
    assert len(blocks) >= 10, f"only {len(blocks)} python/bash blocks found in README.md: is the parser broken?"
    assert {block.skip for block in blocks if block.skip} == {"installs packages and runs every test and benchmark"}


def test_the_parser_reads_the_directives():
    text = ("# title\n## One\n<!-- readme-test: setup\nx = 1\n-->\n\n```python\ny = x\n```\n```text\nnot code\n```\n"
            "## Two\n<!-- readme-test: skip installs things -->\n```bash\npip install x\n```\n"
            "<!-- readme-test: cuda -->\n```python\nz = 1\n```\n")
    sections = parse(text)
    assert list(sections) == ["One", "Two"]
    (one,) = sections["One"]
    assert (one.language, one.code, one.line, one.setup, one.skip) == ("python", "y = x\n", 8, [("x = 1\n", 4)], None)
    skipped, cuda = sections["Two"]
    assert skipped.skip == "installs things" and not skipped.cuda and cuda.cuda and cuda.skip is None
    (listed,) = parse("## Three\n- a list item:\n\n  ```python\n  if True:\n      x = 1\n  ```\n")["Three"]
    assert listed.code == "if True:\n    x = 1\n"


@pytest.mark.parametrize("text, match", [
    ("<!-- readme-test: setup\nx = 1\n-->\nsome text\n```python\n```\n", "must come just before its code block"),
    ("<!-- readme-test: skip -->\n```bash\n```\n", "skip needs a reason"),
    ("<!-- readme-test: setup\nx = 1\n```python\n```\n", "never closed with '-->'"),
    ("<!-- readme-test: setup\nx = 1\n-->\n```\ntree\n```\n", "before a plain block, which is never run"),
    ("```python\nx = 1\n", "a code block that is never closed"),
    ("<!-- readme-test: cuda -->\n", "no code block follows"),
])
def test_the_parser_refuses_misplaced_directives(text, match):
    with pytest.raises(ValueError, match=match):
        parse(text)
