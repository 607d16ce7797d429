"""Checks of `HierarchicalHybridRAG.forward`'s inputs, all before any compute (TypeError / ValueError naming the
argument, what it must be and what it got)."""
import torch

IGNORE_INDEX = -100


def _is_integer(t):
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_tensor(name, value, device):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the model is on {device}")


def _check_ids(name, ids, shape, vocab_size, allow_ignore=False):
    if not _is_integer(ids):
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {ids.dtype}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(ids.shape)}")
    values = ids[ids != IGNORE_INDEX] if allow_ignore else ids
    if values.numel() and (values.min().item() < 0 or values.max().item() >= vocab_size):
        also = f" or {IGNORE_INDEX}" if allow_ignore else ""
        raise ValueError(f"{name} must lie in [0, {vocab_size}){also}, got {values.min().item()} .. "
                         f"{values.max().item()}")


def _check_mask(name, mask, shape):
    """A bool mask, or a 0/1 integer one (the transformers convention), of `shape` -> bool."""
    if mask.dtype != torch.bool:
        if not _is_integer(mask):
            raise TypeError(f"{name} must be a bool or 0/1 integer tensor (True = real token), got dtype {mask.dtype}")
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1, got values {torch.unique(mask)[:8].tolist()}")
        mask = mask.bool()
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    return mask


def check_forward_inputs(model, input_ids, attention_mask, labels, retrieved, retrieved_mask):
    """-> (key_mask (B, T) bool or None when every token is real, retrieved_mask (B, P, Lp) bool or None)."""
    config = model.config
    device = model.embed_tokens.weight.device
    _check_tensor("input_ids", input_ids, device)
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be (B, T) with B, T >= 1, got shape {tuple(input_ids.shape)}")
    shape = tuple(input_ids.shape)
    _check_ids("input_ids", input_ids, shape, config.vocab_size)

    key_mask = None
    if attention_mask is not None:
        _check_tensor("attention_mask", attention_mask, device)
        key_mask = _check_mask("attention_mask", attention_mask, shape)
        if bool(key_mask.all()):
            key_mask = None  # nothing hidden: the kernels' unmasked path
    if labels is not None:
        _check_tensor("labels", labels, device)
        _check_ids("labels", labels, shape, config.vocab_size, allow_ignore=True)
        if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
            raise ValueError(f"labels has no target: labels[:, 1:] (the next tokens of positions 0..T-2) are all "
                             f"{IGNORE_INDEX} (or T = 1), so the loss would be NaN; drop labels or give a target")

    if retrieved is None:
        if retrieved_mask is not None:
            raise ValueError("retrieved_mask was given without retrieved")
        return key_mask, None
    if not config.retrieval:
        raise ValueError("retrieved was given but the model has no retrieval layer (config.retrieval=False)")
    _check_tensor("retrieved", retrieved, device)
    batch, width = shape[0], config.hidden_size
    if retrieved.dtype.is_floating_point:
        if retrieved.dim() != 4 or retrieved.shape[0] != batch or retrieved.shape[3] != width \
                or 0 in retrieved.shape:
            raise ValueError(f"retrieved states must be ({batch}, P, Lp, {width}) with P, Lp >= 1, got shape "
                             f"{tuple(retrieved.shape)}")
        dtype = model.embed_tokens.weight.dtype
        if retrieved.dtype != dtype:
            raise TypeError(f"retrieved states have dtype {retrieved.dtype} but the model has {dtype}")
    else:
        if retrieved.dim() != 3 or retrieved.shape[0] != batch or 0 in retrieved.shape:
            raise ValueError(f"retrieved token ids must be ({batch}, P, Lp) with P, Lp >= 1, got shape "
                             f"{tuple(retrieved.shape)}")
        _check_ids("retrieved", retrieved, tuple(retrieved.shape), config.vocab_size)
    if retrieved.shape[1] > config.max_retrieved:
        raise ValueError(f"retrieved has {retrieved.shape[1]} passages per row, more than max_retrieved="
                         f"{config.max_retrieved}")
    if retrieved_mask is not None:
        _check_tensor("retrieved_mask", retrieved_mask, device)
        if retrieved_mask.dtype != torch.bool:
            raise TypeError(f"retrieved_mask must be a bool tensor (True = real token), got dtype "
                            f"{retrieved_mask.dtype}")
        if tuple(retrieved_mask.shape) != tuple(retrieved.shape[:3]):
            raise ValueError(f"retrieved_mask must have shape {tuple(retrieved.shape[:3])} (batch, passages, "
                             f"passage length), got {tuple(retrieved_mask.shape)}")
    return key_mask, retrieved_mask
