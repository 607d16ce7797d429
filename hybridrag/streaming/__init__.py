"""Streaming: many streams of arriving chunks run through a model in order per stream, with back-pressure.

`StreamBuffer` is a bounded asyncio FIFO that hands chunks out in batches; `StreamProcessor` feeds the chunks of many
streams through a callable (which may keep per-stream state, such as a `StreamingKVCache`) and yields the outputs in
order per stream. `import hybridrag` does not import this package.
"""
from .buffer import StreamBuffer, StreamClosed
from .config import StreamingConfig
from .processor import StreamError, StreamProcessor

__all__ = ["StreamBuffer", "StreamClosed", "StreamProcessor", "StreamError", "StreamingConfig"]
