"""python -m hybridrag: the system's command line (see hybridrag.cli)."""
import sys

from .cli import main

sys.exit(main())
