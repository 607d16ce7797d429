"""python -m hybridrag.retrieval: see hybridrag.retrieval.cli."""
import sys

from .cli import main

sys.exit(main())
