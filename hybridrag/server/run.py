"""`serve`: build or reload the system kept in a state folder, then run the app with uvicorn."""
import os
from pathlib import Path

API_KEY_ENV = "HYBRIDRAG_API_KEY"


def open_system(state_dir, documents=None, config=None):
    """The HybridRAGSystem kept in `state_dir`: reloaded when the folder holds one (then `documents` must be None:
    add more through POST /documents), else built from `documents` (a list of Document) with `config` and saved
    there first."""
    from ..system import HybridRAGSystem, create_hybrid_rag_system

    state_dir = Path(state_dir)
    if (state_dir / "config.json").is_file():
        if documents is not None:
            raise ValueError(f"{state_dir} already holds a system: serve it without --docs, and add documents "
                             "through POST /documents")
        if config is not None:
            raise ValueError(f"{state_dir} already holds a system with its own config: leave out --config")
        return HybridRAGSystem.load(state_dir)
    if not documents:
        raise ValueError(f"{state_dir} holds no system yet: give --docs to build one there")
    system = create_hybrid_rag_system(config)
    system.create_vectorstore(documents)
    system.save(state_dir)
    return system


def serve(system, state_dir, *, host="127.0.0.1", port=8000, api_key=None, log_level="info", **options):
    """Run the app over `system` (saving its changes into `state_dir`) until interrupted. api_key defaults to the
    HYBRIDRAG_API_KEY environment variable (none: the state-changing endpoints are open); `options` are
    create_app's (capacity, timeout_s, cascade_measure, ...)."""
    import uvicorn

    from .app import create_app

    app = create_app(system, state_dir=state_dir, api_key=api_key or os.environ.get(API_KEY_ENV) or None, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
