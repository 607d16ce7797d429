"""The hybrid pattern at the scale of one tile, for the Triton kernels: which (row, key) pairs are visible, the
rows of a block, and the band's key blocks within a key split."""
import triton
import triton.language as tl

from ..triton_common import _block_range


@triton.jit
def _visible(p, j, valid, LEFT, RIGHT, CAUSAL: tl.constexpr, kv_start, MODE: tl.constexpr):
    """Visibility of keys at positions j from queries at positions p (broadcastable 2-D).
    MODE 1: main keys in the band [p - LEFT, p + RIGHT] at or after kv_start (causal is folded into RIGHT).
    MODE 2: gathered extra keys: landmarks outside the band (causal, kv_start apply), or memory tokens (j < 0)."""
    in_band = (j >= p - LEFT) & (j <= p + RIGHT)
    if MODE == 1:
        seen = in_band & (j >= kv_start)
    else:
        seen = (~in_band) & (j >= kv_start)
        if CAUSAL:
            seen = seen & (j <= p)
        seen = seen | (j < 0)
    return seen & valid


@triton.jit
def _rows(ROWS, start_r, R, Tq, Tk, GATHERED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of this block: index into the launch's row set, query row, position, and the first/last position."""
    offs_r = start_r + tl.arange(0, BLOCK_M)
    mask_r = offs_r < R
    if GATHERED:
        row = tl.load(ROWS + offs_r, mask=mask_r, other=0)
    else:
        row = offs_r
    pos = row + (Tk - Tq)
    first = tl.min(tl.where(mask_r, pos, Tk + Tq), 0)
    last = tl.max(tl.where(mask_r, pos, -Tq), 0)
    return offs_r, mask_r, row, pos, first, last


@triton.jit
def _key_blocks(first, last, LEFT, RIGHT, Tk, k_lo, k_hi, BLOCK_N: tl.constexpr):
    """_block_range of the band, clipped to this program's key split [k_lo, k_hi) (k_lo block-aligned)."""
    lo, mid_lo, mid_hi, hi = _block_range(first, last, LEFT, RIGHT, Tk, BLOCK_N)
    lo = tl.minimum(tl.maximum(lo, k_lo), k_hi)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), k_hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), k_hi)
    hi = tl.minimum(tl.maximum(hi, mid_hi), k_hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _key_ok(KEY_MASK, kpos, valid):
    """Keys at positions kpos [N] that the key padding mask lets through (KEY_MASK points at this batch row's
    (Tk,) uint8 mask); memory tokens, at negative positions, always pass."""
    return tl.load(KEY_MASK + kpos, mask=valid & (kpos >= 0), other=1) != 0


@triton.jit
def _masked_scores(s, pos, kpos, valid, LEFT, RIGHT, CAUSAL: tl.constexpr, kv_start, KEY_MASK,
                   MODE: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """Scores [M, N] with -inf where hidden. MODE 0: interior band blocks (only kv_start and the key mask can hide
    a key)."""
    if MODE == 0:
        if HAS_KV_START:
            s = tl.where(kpos[None, :] >= kv_start, s, float("-inf"))
    else:
        s = tl.where(_visible(pos[:, None], kpos[None, :], valid[None, :], LEFT, RIGHT, CAUSAL, kv_start, MODE),
                     s, float("-inf"))
    if HAS_KEY_MASK:
        s = tl.where(_key_ok(KEY_MASK, kpos, valid)[None, :], s, float("-inf"))
    return s


@triton.jit
def _key_positions(KPOS, idx, valid, MODE: tl.constexpr):
    if MODE == 2:  # gathered keys carry their positions
        kpos = tl.load(KPOS + idx, mask=valid, other=0)
    else:
        kpos = idx
    return kpos
