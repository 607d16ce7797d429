#!/usr/bin/env bash
# Set-up for a fresh machine: keeps an installed torch (a GPU machine's own build), else takes the CPU build,
# then installs hybridrag in editable mode with the extras named by $1 (default: test).
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${1:-test}]"
