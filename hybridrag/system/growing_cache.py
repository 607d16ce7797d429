"""A transformers KV cache whose layers append in place.

transformers' DynamicLayer concatenates on every update, copying every cached key and value each time a step adds
tokens: a decode step over a 2k-token prompt copies 30 layers' caches to add one row. `GrowingLayer` keeps each
layer's keys and values in buffers with room to spare and writes a step's rows after the last ones; its `keys` and
`values` are views of the filled part, so attention reads them as it reads a DynamicLayer's. A buffer that runs out
of room doubles (amortised O(1) copies a token).

Memory: per layer, two (B, Hkv, capacity, D) buffers, capacity >= the cached length (at most twice it once grown).
"""
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer backed by buffers of `capacity` positions (grown by doubling when a step needs more)."""

    def __init__(self, capacity=0):
        super().__init__()
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self._key_buffer = self._value_buffer = None

    @classmethod
    def over(cls, key_buffer, value_buffer, length):
        """A layer holding the first `length` rows of key_buffer/value_buffer (B, Hkv, capacity, D), which it
        then fills in place (the caller wrote those rows)."""
        if key_buffer.shape != value_buffer.shape or key_buffer.dim() != 4 or not 0 <= length <= key_buffer.shape[2]:
            raise ValueError(f"buffers must be two (B, Hkv, capacity, D) tensors of one shape with length <= "
                             f"capacity, got {tuple(key_buffer.shape)}, {tuple(value_buffer.shape)}, length {length}")
        layer = cls(key_buffer.shape[2])
        layer.lazy_initialization(key_buffer, value_buffer)
        layer._key_buffer, layer._value_buffer = key_buffer, value_buffer
        layer.keys, layer.values = key_buffer[:, :, :length], value_buffer[:, :, :length]
        return layer

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None

    def _holds_prefix_views(self):
        """Whether keys/values are still the leading rows of the buffers (crop keeps them so; a beam reorder,
        batch selection or offload replaces them with other tensors)."""
        return all(buffer is not None and view._base is buffer and view.data_ptr() == buffer.data_ptr()
                   and view.stride() == buffer.stride() and view.shape[:2] == buffer.shape[:2]
                   for view, buffer in ((self.keys, self._key_buffer), (self.values, self._value_buffer)))

    def _grow(self, key_states, value_states, held, needed):
        """Buffers of max(capacity, needed, 2 x held) positions, starting with the held rows."""
        capacity = max(self.capacity, needed, 2 * held)
        keys = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        if held:
            keys[:, :, :held].copy_(self.keys)
            values[:, :, :held].copy_(self.values)
        self._key_buffer, self._value_buffer, self.capacity = keys, values, capacity

    def update(self, key_states, value_states, *args, **kwargs):
        """Write key_states/value_states (B, Hkv, t, D) after the cached rows; return views of every row."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        needed = held + key_states.shape[-2]
        if held == 0 or not self._holds_prefix_views() or needed > self._key_buffer.shape[2]:
            self._grow(key_states, value_states, held, needed)
        self._key_buffer[:, :, held:needed].copy_(key_states)
        self._value_buffer[:, :, held:needed].copy_(value_states)
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def reset(self):
        self._key_buffer = self._value_buffer = None
        super().reset()


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers (every layer full attention: keeps every key)."""

    def __init__(self, layers):
        if not layers or not all(isinstance(layer, GrowingLayer) for layer in layers):
            raise TypeError(f"layers must be a non-empty list of GrowingLayer, got {layers!r}")
        Cache.__init__(self, layers=layers)

    @classmethod
    def for_model(cls, config, capacity):
        """An empty cache for a model whose every layer is full attention, or None for any other (sliding-window
        or linear-attention layers keep their own kind of cache: use DynamicCache(config=config))."""
        kinds = DynamicCache(config=config).layers
        if any(type(layer) is not DynamicLayer for layer in kinds):
            return None
        return cls([GrowingLayer(capacity) for _ in kinds])
