"""The HTTP server over the hybrid RAG system: `create_app(system, ...)` (FastAPI) and `serve(...)` (uvicorn).
See hybridrag.server.app for the endpoints. `hybridrag serve --kb DIR` runs it from the command line."""
from .._optional import import_optional

import_optional("fastapi", "fastapi>=0.110", extra="server")
import_optional("uvicorn", "uvicorn>=0.30", extra="server")

from .app import create_app  # noqa: E402  (after the check, so a missing FastAPI says what to install)
from .run import open_system, serve  # noqa: E402

__all__ = ["create_app", "open_system", "serve"]
