"""StreamingConfig: a StreamProcessor's settings, checked when built, read from a dict or a JSON/YAML file.

    config = StreamingConfig.from_any(None | StreamingConfig | dict | "streaming.json" | "streaming.yaml")
    processor = config.processor(process_fn)        # StreamProcessor(process_fn, **config.processor_options())

Unknown keys are refused, never ignored; every error names the field, what it must be and what it got. The loader
is hybridrag.config_file's (standard library only, so streaming still depends on no other layer).
"""
import dataclasses
from dataclasses import dataclass

from ..config_file import ConfigFile
from .buffer import check_count, check_timeout

__all__ = ["StreamingConfig"]


@dataclass
class StreamingConfig(ConfigFile):
    """StreamProcessor's arguments (see hybridrag.streaming.processor for their exact meaning).

    max_pending: the most accepted chunks waiting to be processed (>= 1); submit waits beyond it (back-pressure,
        nothing dropped).
    batch_size: the most chunks taken in one batch (1 <= batch_size <= max_pending).
    timeout: seconds a batch waits after its first chunk for more (finite >= 0).
    max_results: None (= max_pending) or the most results waiting to be read (>= 1).
    """

    max_pending: int = 64
    batch_size: int = 8
    timeout: float = 0.0
    max_results: int | None = None

    def __post_init__(self):
        check_count("max_pending", self.max_pending)
        check_count("batch_size", self.batch_size)
        if self.batch_size > self.max_pending:
            raise ValueError(f"batch_size must be <= max_pending ({self.max_pending}), got {self.batch_size}")
        self.timeout = check_timeout("timeout", self.timeout)
        if self.max_results is not None:
            check_count("max_results", self.max_results)

    def to_dict(self):
        return dataclasses.asdict(self)

    def processor_options(self):
        """The keyword arguments of StreamProcessor."""
        return {"max_pending": self.max_pending, "batch_size": self.batch_size, "timeout": self.timeout,
                "max_results": self.max_results}

    def processor(self, process_fn):
        """A StreamProcessor of process_fn(stream_id, chunk) with these settings."""
        from .processor import StreamProcessor

        return StreamProcessor(process_fn, **self.processor_options())
