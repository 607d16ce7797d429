"""`capture_attention_mass`: the attention mass each key segment receives inside a transformers model running with
attn_implementation="hybridrag", recorded per attention call through `hybridrag.attention_mass` (no T x T matrix)."""
import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from ..ops import attention_mass
from ..ops.validation import check_tensor

_ACTIVE = contextvars.ContextVar("hybridrag_attention_mass_capture", default=None)


class AttentionMassRecord(list):
    """The (B, H, S) float32 masses, one per attention call in call order; `layers[i]` is the layer index of entry i
    and `query_positions[i]` the (first, last + 1) key positions of its queries."""

    def __init__(self):
        super().__init__()
        self.layers, self.query_positions = [], []

    def by_layer(self):
        """{layer index: (calls, B, H, S) stacked masses} (calls > 1 under generate: prefill, then each step)."""
        grouped = {}
        for layer, mass in zip(self.layers, self):
            grouped.setdefault(layer, []).append(mass)
        return {layer: torch.stack(masses) for layer, masses in grouped.items()}


@dataclass
class _Capture:
    segments: torch.Tensor  # (B, T) int64, -1 = none
    num_segments: int
    rows: torch.Tensor  # (B, T) bool or None (every query row)
    record: AttentionMassRecord = field(default_factory=AttentionMassRecord)

    def _over(self, values, lo, hi, fill):
        """values[:, lo:hi], padded with `fill` past the end of `values` (positions the caller did not cover)."""
        part = values[:, lo:min(hi, values.shape[1])]
        missing = hi - lo - part.shape[1]
        if missing > 0:
            part = torch.cat([part, part.new_full((part.shape[0], missing), fill)], dim=1)
        return part

    def add(self, module, query, key, window, **pattern):
        """Record the mass of one attention call: query (B, H, Tq, D) at key positions Tk - Tq .. Tk - 1."""
        tq, tk = query.shape[2], key.shape[2]
        segments = self._over(self.segments.to(key.device), 0, tk, -1)
        rows = None if self.rows is None else self._over(self.rows.to(query.device), tk - tq, tk, False)
        mass = attention_mass(query, key, segments, self.num_segments, window, query_mask=rows, **pattern)
        self.record.append(mass)
        self.record.layers.append(getattr(module, "layer_idx", None))
        self.record.query_positions.append((tk - tq, tk))


def active_capture():
    """The capture of the innermost `capture_attention_mass` block, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def capture_attention_mass(model, segments, rows=None, num_segments=None):
    """Record the attention mass that each key segment receives from the selected query rows, per attention call.

        with capture_attention_mass(model, segments, rows=answer_rows) as mass:
            model(input_ids)               # or model.generate(...)
        mass[0]                            # (B, H, S) float32: layer 0's first call
        mass.by_layer()[0].mean(0)         # averaged over layer 0's calls

    Args:
        model: a transformers model using attn_implementation="hybridrag".
        segments: (B, T) integer segment id of each position in [0, S), -1 for none; positions past T (tokens
            generated later) belong to no segment.
        rows: (B, T) bool, the query positions to average over (e.g. the answer's tokens); default every query row
            of each call. Positions past T are not selected.
        num_segments: S; default segments.max() + 1.

    Yields an `AttentionMassRecord`: a list of (B, H, S) float32 tensors, one per attention call inside the block,
    in call order, with `.layers` and `.query_positions`. Computed by `hybridrag.attention_mass` with each layer's
    own pattern (window, landmarks, memory tokens, padding): memory O(B x H x (T + S)) per call, never T x T.
    Key positions are cache positions, so the model's caches must keep every key (a sliding-window cache that
    dropped keys would shift them): use no cache or `DynamicCache()` without a config.
    """
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "hybridrag":
        raise ValueError("capture_attention_mass needs a model running attn_implementation='hybridrag' (call "
                         "model.set_attn_implementation('hybridrag') after hybridrag.integrations.transformers."
                         "register()), got " + repr(getattr(getattr(model, "config", None), "_attn_implementation",
                                                            type(model).__name__)))
    check_tensor("segments", segments)
    if segments.dim() != 2 or segments.dtype.is_floating_point or segments.dtype == torch.bool:
        raise TypeError(f"segments must be a 2-D integer tensor (batch, positions), got dtype {segments.dtype} and "
                        f"shape {tuple(segments.shape)}")
    if rows is not None:
        check_tensor("rows", rows)
        if rows.dtype != torch.bool or rows.shape != segments.shape:
            raise ValueError(f"rows must be a bool tensor shaped like segments {tuple(segments.shape)}, got dtype "
                             f"{rows.dtype} and shape {tuple(rows.shape)}")
    if num_segments is None:
        num_segments = max(int(segments.max()) + 1, 1)
    capture = _Capture(segments.long(), num_segments, rows)
    token = _ACTIVE.set(capture)
    try:
        yield capture.record
    finally:
        _ACTIVE.reset(token)
